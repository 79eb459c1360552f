"""Random checkpoints written layer by layer: grown in steps they equal one written at once, and they load."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from sqdeploy.model.checkpoint import HFCheckpoint
from sqdeploy.model.tokenizer import load_tokenizer
from sqdeploy.testing.random_checkpoint import (
    SMALL,
    checkpoint_bytes,
    extend_random_llama,
    random_prompts,
    with_layers,
    write_random_llama,
)

TINY = {**SMALL, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 300}


def _tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_grown_equals_written_at_once_and_shallower_links(tmp_path):
    once = write_random_llama(tmp_path / "once", TINY, 3, device="cpu")
    grown = write_random_llama(tmp_path / "grown", TINY, 1, device="cpu")
    extend_random_llama(grown, TINY, 1, 3, device="cpu")
    a, b = _tensors(once), _tensors(grown)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sum(f.stat().st_size for f in once.glob("*.safetensors")) >= checkpoint_bytes(TINY, 3)
    two = with_layers(once, tmp_path / "two", 2)
    assert json.loads((two / "config.json").read_text())["num_hidden_layers"] == 2
    assert (two / "model-layer-00001.safetensors").stat().st_ino == (once / "model-layer-00001.safetensors").stat().st_ino
    assert not (two / "model-layer-00002.safetensors").exists()
    ck = HFCheckpoint(two)
    assert ck.config.num_layers == 2 and ck.config.hidden_size == 64


def test_tokenizer_and_prompts_fit_the_vocabulary(tmp_path):
    model = write_random_llama(tmp_path / "m", TINY, 1, device="cpu")
    tok = load_tokenizer(model)
    assert len(tok) == TINY["vocab_size"] and tok.eos_token_id == 2
    prompts = random_prompts(tmp_path / "p.jsonl", TINY["vocab_size"], texts=3, words=50)
    text = json.loads(prompts.read_text().splitlines()[0])["text"]
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == 50 and 0 not in ids and max(ids) < TINY["vocab_size"]  # no unknown words
