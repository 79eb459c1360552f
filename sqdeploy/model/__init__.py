"""The reference decoder, its lazy checkpoint reader and loaders."""

from sqdeploy.model.checkpoint import HFCheckpoint
from sqdeploy.model.loading import load_block, load_model
from sqdeploy.model.transformer import Block, Context, KVCache, Transformer

__all__ = ["HFCheckpoint", "load_block", "load_model", "Block", "Context", "KVCache", "Transformer"]
