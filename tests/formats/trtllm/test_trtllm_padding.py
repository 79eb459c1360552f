"""Group-wise INT4 checkpoints whose MLP width does not split into whole kernel tiles per rank.

TensorRT-LLM's WeightOnlyGroupwiseQuantLinear / RowLinear (tensorrt_llm/quantization/layers.py)
round a linear's global in/out features up to ``max(64, group_size) * tp_size`` and then expect
rank tensors of the padded size; its loader builds that padding itself only for GPTQ
checkpoints (``postprocess_weight_only_groupwise`` in tensorrt_llm/quantization/functional.py:
zero weights, unit scales, appended after the real rows) and refuses it for ModelOpt-style AWQ.
sq-deploy therefore writes the padding into the checkpoint and the padded ``intermediate_size``
into config.json.

The model here: hidden 256, intermediate 640 (5 groups of 128). At tp 1 it needs no padding
(640 is a multiple of 128); at tp 2 the tile is 256, so 640 becomes 768 (384 per rank) where the
unpadded split (320 per rank) would cut a group. At tp 4 the tile is 512 and hidden 256 itself
is not a multiple: that cannot be padded exactly and is refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.families import FAMILIES
from sqdeploy.formats.trtllm.check import check_dir
from sqdeploy.formats.trtllm.config import QuantSpec, check_split, padded_intermediate
from sqdeploy.formats.trtllm.pack import unpack_int4_rows
from sqdeploy.formats.trtllm.reader import TrtllmCheckpoint
from sqdeploy.model.loading import load_model
from sqdeploy.quantize.pipeline import Calibration, Runtime, quantize_to_dir
from sqdeploy.quantize.recipes import load_recipe
from sqdeploy.runtime.tp import TPEngine, build_rank_model
from sqdeploy.testing.random_model import TINY_CONFIGS, make_random_model
from tests.conftest import SHARED_MODEL
from tests.formats.trtllm.test_trtllm_support import export, tp_forward

HIDDEN, INTER, GROUP, PADDED = 256, 640, 128, 768
SHAPES = {
    "llama": dict(TINY_CONFIGS["llama"], hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64),
    "opt": dict(TINY_CONFIGS["opt"], hidden_size=HIDDEN, ffn_dim=INTER, num_attention_heads=4, word_embed_proj_dim=HIDDEN),
}
IDS = torch.randint(0, 8000, (2, 16), generator=torch.Generator().manual_seed(0))
AWQ = QuantSpec("W4A16_AWQ", None, GROUP, False, True)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, calib_file):
    """(family, recipe) -> {tp: checkpoint dir} at tp 1 (no padding) and tp 2 (padded)."""
    root, made = tmp_path_factory.mktemp("int4pad"), {}

    def get(family: str, recipe: str) -> dict:
        if (family, recipe) not in made:
            model = root / f"{family}-model"
            if not model.exists():
                make_random_model(SHAPES[family], model, tokenizer_from=SHARED_MODEL if SHARED_MODEL.exists() else None)
            q = root / f"{family}-{recipe}"
            quantize_to_dir(model, load_recipe(recipe), q, Calibration(str(calib_file), 2, 32), Runtime(progress=False),
                            keep_source=True)
            made[family, recipe] = {}
            for tp in (1, 2):
                out = root / f"{family}-{recipe}-tp{tp}"
                get.reports[family, recipe, tp] = export(q, out, tp)
                made[family, recipe][tp] = out
        return made[family, recipe]

    get.reports = {}
    return get


def test_padding_rule_follows_tensorrt_llm():
    """max(64, group) * tp (WeightOnlyGroupwiseQuantLinear), rounded up with math.ceil as TensorRT-LLM does."""
    cfg = FAMILIES["llama"].config_from_hf(dict(SHAPES["llama"], vocab_size=8192))
    for tp, tile in ((1, 128), (2, 256)):
        assert padded_intermediate(cfg, AWQ, tp) == math.ceil(INTER / tile) * tile
    assert padded_intermediate(cfg, AWQ, 2) == PADDED
    # group 64: tile 64 * tp; 640 splits into whole tiles of 128 and 256 -> nothing to pad
    g64 = replace(AWQ, group_size=64)
    assert [padded_intermediate(cfg, g64, tp) for tp in (1, 2, 4)] == [640, 640, 768]
    # Llama-2-7B at tp 8: 11008 -> 11264 (11 groups of 128 per rank)
    big = replace(cfg, hidden_size=4096, intermediate_size=11008, num_heads=32, num_kv_heads=32, head_dim=128)
    assert padded_intermediate(big, AWQ, 8) == 11264
    check_split(FAMILIES["llama"], big, AWQ, 8, pad=True)
    # not group-wise INT4: never padded (trtllm-build quantizes weight-only float weights itself)
    assert padded_intermediate(cfg, QuantSpec("W4A16"), 2) == INTER


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_padded_config_and_shapes(exports, family):
    ckpts = exports(family, "w4a16-rtn")
    one, two = (json.loads((ckpts[tp] / "config.json").read_text()) for tp in (1, 2))
    assert one["intermediate_size"] == INTER and "unpadded_intermediate_size" not in one["producer"]
    assert two["intermediate_size"] == PADDED and two["producer"]["unpadded_intermediate_size"] == INTER
    assert two["mapping"]["tp_size"] == 2 and two["quantization"]["group_size"] == GROUP
    report = exports.reports[family, "w4a16-rtn", 2]
    assert report["unpadded_intermediate_size"] == INTER and f"{INTER} padded to {PADDED}" in report["summary"]
    assert exports.reports[family, "w4a16-rtn", 1]["unpadded_intermediate_size"] is None
    res = check_dir(ckpts[2])
    assert res.ok, res.table()
    assert any(r[0] == "MLP padding" and r[1] == "ok" for r in res.rows)
    n = PADDED // 2  # 384 per rank: 3 whole groups of 128, a multiple of max(64, 128)
    p = "transformer.layers.0.mlp."
    for r in (0, 1):
        t = load_file(str(ckpts[2] / f"rank{r}.safetensors"))
        assert t[p + "fc.weight"].shape == (n // 2, HIDDEN) and t[p + "fc.weights_scaling_factor"].shape == (n, HIDDEN // GROUP)
        assert t[p + "proj.weight"].shape == (HIDDEN // 2, n) and t[p + "proj.weights_scaling_factor"].shape == (HIDDEN, n // GROUP)
        assert t[p + "proj.prequant_scaling_factor"].shape == (n,)
        if family == "llama":
            assert t[p + "gate.weight"].shape == (n // 2, HIDDEN)
        else:
            assert t[p + "fc.bias"].shape == (n,)
    last = load_file(str(ckpts[2] / "rank1.safetensors"))
    real = INTER - n  # rank 1: rows 384..639 real, 640..767 padding
    assert not last[p + "fc.weight"][real // 2:].any() and torch.equal(last[p + "fc.weights_scaling_factor"][real:],
                                                                        torch.ones(n - real, HIDDEN // GROUP))
    assert not last[p + "proj.weight"][:, real:].any()
    assert torch.equal(last[p + "proj.prequant_scaling_factor"][real:].float(), torch.ones(n - real))
    if family == "opt":
        assert not last[p + "fc.bias"][real:].any()


@pytest.mark.parametrize("family,recipe", [("llama", "w4a16-rtn"), ("llama", "w4a16-awq"), ("opt", "w4a16-rtn")])
def test_padded_checkpoint_gives_the_unpadded_logits(exports, family, recipe):
    ckpts = exports(family, recipe)
    one, two = TrtllmCheckpoint(ckpts[1]), TrtllmCheckpoint(ckpts[2])
    with torch.no_grad():
        ref = build_rank_model(one, 0, torch.device("cpu"), torch.float32)(IDS)
        torch.testing.assert_close(load_model(two)(IDS), load_model(one)(IDS), rtol=0, atol=1e-5)
        torch.testing.assert_close(tp_forward(two, IDS), load_model(one)(IDS), rtol=1e-5, atol=1e-5)
    with TPEngine(str(ckpts[2]), device="cpu") as eng:
        assert eng.tp == 2
        got = eng.logits(IDS)
    assert float((got - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("recipe", ["w4a16-rtn", "w4a16-awq"])
def test_unpadded_integers_equal_the_export_that_needs_no_padding(exports, recipe):
    ckpts = exports("llama", recipe)
    one, two = TrtllmCheckpoint(ckpts[1]), TrtllmCheckpoint(ckpts[2])
    for i in range(one.config.num_layers):
        for name in ("gate", "up"):
            a = one.rank_linear(0, i, name)
            q = torch.cat([two.rank_linear(r, i, name).q for r in (0, 1)])
            s = torch.cat([two.rank_linear(r, i, name).scale for r in (0, 1)])
            assert torch.equal(q[:INTER], a.q) and not q[INTER:].any(), (i, name)
            assert torch.equal(s[:INTER], a.scale) and bool((s[INTER:] == 1).all()), (i, name)
        a = one.rank_linear(0, i, "down")
        q = torch.cat([two.rank_linear(r, i, "down").q for r in (0, 1)], 1)
        s = torch.cat([two.rank_linear(r, i, "down").scale for r in (0, 1)], 1)
        assert torch.equal(q[:, :INTER], a.q) and not q[:, INTER:].any(), i
        assert torch.equal(s[:, : INTER // GROUP], a.scale) and bool((s[:, INTER // GROUP:] == 1).all()), i
        for name in ("q", "k", "v", "o"):  # attention is split as before: rank 0 holds the first heads
            whole, part = one.rank_linear(0, i, name).q, two.rank_linear(0, i, name).q
            want = whole[:, : part.shape[1]] if name == "o" else whole[: part.shape[0]]
            assert torch.equal(part, want), (i, name)


def test_nonzero_padding_fails_the_check(exports, tmp_path):
    src = exports("llama", "w4a16-rtn")[2]
    out = tmp_path / "bad"
    out.mkdir()
    for f in src.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    t = load_file(str(out / "rank1.safetensors"))
    w = t["transformer.layers.1.mlp.proj.weight"].clone()
    w[:, -1] = 17  # a padded input column (nibble 1 of row 0, nibble 1 of row 1)
    t["transformer.layers.1.mlp.proj.weight"] = w
    save_file(t, str(out / "rank1.safetensors"), metadata={"format": "pt"})
    res = check_dir(out)
    assert not res.ok and res.first_failure().startswith("MLP padding: ") and "layer 1 down rank 1" in res.first_failure()
    assert unpack_int4_rows(w)[:, -1].abs().sum() > 0


def test_what_cannot_be_padded_exactly_is_still_refused(exports, tmp_path, monkeypatch):
    fam = FAMILIES["llama"]
    cfg = fam.config_from_hf(dict(SHAPES["llama"], vocab_size=8192))
    # tp 4: tile 512, and hidden 256 / attention dims are not multiples: padding the MLP cannot help
    with pytest.raises(SqDeployError) as e:
        check_split(fam, cfg, AWQ, 4, pad=True)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--tp 4 is not possible") and "attention.qkv" in msg and "use --tp 1 or 2" in msg
    # an intermediate size that is not whole groups: padding would change a group's scale
    odd = replace(cfg, intermediate_size=704)
    assert padded_intermediate(odd, AWQ, 2) == 704
    with pytest.raises(SqDeployError, match=r"^--tp 2 is not possible.*mlp\.fc \(in 256, out 704\)"):
        check_split(fam, odd, AWQ, 2, pad=True)
    # a non-gated MLP whose activation does not map 0 to 0: padded rows would not be zero
    import sqdeploy.model.layers as layers

    monkeypatch.setitem(layers.ACTIVATIONS, "shifted", lambda x: x + 1)
    opt = FAMILIES["opt"]
    shifted = replace(opt.config_from_hf(dict(SHAPES["opt"], vocab_size=8192)), act="shifted")
    assert padded_intermediate(shifted, AWQ, 2) == INTER
    with pytest.raises(SqDeployError, match="--tp 2 is not possible"):
        check_split(opt, shifted, AWQ, 2, pad=True)
    # the export itself refuses in one line, before writing anything
    q = exports("llama", "w4a16-rtn")[1].parent / "llama-w4a16-rtn"
    with pytest.raises(SqDeployError) as e:
        export(q, tmp_path / "tp4", 4)
    assert "\n" not in str(e.value) and "--tp 4 is not possible" in str(e.value)
    assert not any((tmp_path / "tp4").iterdir())
