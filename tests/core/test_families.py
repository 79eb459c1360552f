"""The family registry and the reference model against transformers' own implementations."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.families import FAMILIES, family_for_hf_config, supported_architectures
from sqdeploy.model import HFCheckpoint, load_model
from sqdeploy.testing.random_model import TINY_CONFIGS


def test_every_family_has_a_tiny_config():
    assert set(FAMILIES) == set(TINY_CONFIGS)


def test_tiny_llama_keeps_gqa():
    cfg = TINY_CONFIGS["llama"]
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]


def test_unknown_architecture_lists_supported():
    with pytest.raises(SqDeployError) as e:
        family_for_hf_config({"architectures": ["GPT2LMHeadModel"]})
    for arch in supported_architectures():
        assert arch in str(e.value)


@pytest.mark.parametrize("left_pad", [0, 5])
def test_reference_matches_transformers(tiny_model, left_pad):
    ck = HFCheckpoint(tiny_model)
    ours = load_model(ck)
    theirs = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    torch.manual_seed(0)
    ids = torch.randint(0, ck.config.vocab_size, (2, 80))
    mask = torch.ones_like(ids)
    mask[1, :left_pad] = 0
    with torch.no_grad():
        a = ours(ids, attention_mask=mask)
        b = theirs(ids, attention_mask=mask).logits
    # padded positions are undefined; compare real tokens only
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a[1, left_pad:], b[1, left_pad:], rtol=1e-5, atol=1e-5)


def test_kv_cache_decode_matches_full_pass(tiny_model):
    from sqdeploy.model.transformer import KVCache

    model = load_model(HFCheckpoint(tiny_model))
    ids = torch.randint(0, 1000, (1, 40))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(len(model.layers))
        step = [model(ids[:, :32], cache=cache)]
        for t in range(32, 40):
            step.append(model(ids[:, t : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(step, dim=1), full, rtol=1e-4, atol=1e-5)


def test_shared_model_is_llama_gqa(shared_model):
    cfg = HFCheckpoint(shared_model).config
    assert (cfg.family, cfg.num_heads, cfg.num_kv_heads, cfg.tie_embeddings) == ("llama", 6, 2, True)


def test_opt_post_norm_refused(tmp_path, tiny_models):
    cfg = json.loads((tiny_models["opt"] / "config.json").read_text())
    cfg["do_layer_norm_before"] = False
    with pytest.raises(SqDeployError, match="do_layer_norm_before"):
        family_for_hf_config(cfg).config_from_hf(cfg)
