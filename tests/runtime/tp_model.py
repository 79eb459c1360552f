"""The tiny Llama the tensor-parallel tests shard: heads and MLP split evenly over two ranks, also at INT4."""

from __future__ import annotations

from pathlib import Path

from sqdeploy.testing.random_model import make_random_model
from tests.conftest import SHARED_MODEL


def tp_llama(root: Path) -> Path:
    return make_random_model("llama", root / "llama", tokenizer_from=SHARED_MODEL if SHARED_MODEL.exists() else None,
                             hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=32)
