"""The reference decoder, its lazy checkpoint reader and loaders."""

from .checkpoint import HFCheckpoint
from .loading import load_block, load_model
from .transformer import Block, Context, KVCache, Transformer

__all__ = ["HFCheckpoint", "load_block", "load_model", "Block", "Context", "KVCache", "Transformer"]
