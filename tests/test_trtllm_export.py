"""sq-export --target trtllm on tiny models: every family, recipe and tp in 1, 2, 4, 8.

Each export must pass the checker, read back (ranks merged) to exactly the PyTorch
reference of the quantized directory, and give the same logits when run rank by rank
from ``rank_linear``/``rank_globals`` with row-parallel outputs summed, as a
tensor-parallel engine does.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sqdeploy.exporter.pipeline import Calibration, Runtime, quantize_to_dir
from sqdeploy.exporter.qmodel import QuantizedModel
from sqdeploy.exporter.recipes import load_recipe, parse_recipe
from sqdeploy.exporter.trtllm.check import check_dir
from sqdeploy.exporter.trtllm.linear import trtllm_weight_only
from sqdeploy.exporter.trtllm.pack import pack_int4_rows, unpack_int4_rows
from sqdeploy.exporter.trtllm.reader import TrtllmCheckpoint
from sqdeploy.exporter.trtllm.requant import SmoothedWeights
from sqdeploy.model.loading import load_model
from sqdeploy.random_model import TINY_CONFIGS, make_random_model
from tests.test_trtllm_support import export, tp_forward

TPS = (1, 2, 4, 8)
IDS = torch.randint(0, 8000, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny_models, calib_file):
    """(family or model dir, recipe) -> quantized directory, made once."""
    root, made = tmp_path_factory.mktemp("trtllm-q"), {}

    def get(model, recipe, name=None):
        key = (str(model), name or str(recipe))
        if key not in made:
            src = tiny_models[model] if model in tiny_models else model
            out = root / f"q{len(made)}"
            quantize_to_dir(src, recipe, out, Calibration(str(calib_file), 4, 64), Runtime(progress=False))
            made[key] = out
        return made[key]

    return get


def _logits(src) -> torch.Tensor:
    with torch.no_grad():
        return load_model(src)(IDS)


@pytest.mark.parametrize("recipe", ["fp16", "w8a8-sq", "w8a8-sq-pertoken"])
@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_export_reads_back_exactly_at_every_tp(family, recipe, quantized, tmp_path):
    qdir = quantized(family, recipe)
    ref = _logits(QuantizedModel(qdir))
    for tp in TPS:
        out = tmp_path / f"tp{tp}"
        export(qdir, out, tp)
        assert check_dir(out).ok, check_dir(out).table()
        ck = TrtllmCheckpoint(out)
        torch.testing.assert_close(_logits(ck), ref, rtol=0, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(tp_forward(ck, IDS), ref, rtol=1e-5, atol=1e-5)


def test_config_and_layout_follow_tensorrt_llm(quantized, tmp_path):
    """Llama/GQA at tp 4: fused qkv rows per rank, KV heads split, padded lm_head, plugin names."""
    out = tmp_path / "ckpt"
    export(quantized("llama", "w8a8-sq-pertoken"), out, 4, kv_cache="int8")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "LlamaForCausalLM" and cfg["mapping"] == {"world_size": 4, "tp_size": 4, "pp_size": 1}
    assert cfg["quantization"]["quant_algo"] == "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"
    assert cfg["quantization"]["kv_cache_quant_algo"] == "INT8"
    assert cfg["rotary_base"] == 10000.0 and cfg["num_key_value_heads"] == 2 and cfg["head_size"] == 16
    r1 = load_file(str(out / "rank1.safetensors"))
    p = "transformer.layers.0."
    # 8 heads / 4 ranks = 2 q heads; 2 KV heads / 4 ranks -> 1 (duplicated) KV head each; head 16
    assert r1[p + "attention.qkv.weight"].shape == (64, 128) and r1[p + "attention.qkv.weight"].dtype == torch.int8
    assert r1[p + "attention.qkv.per_channel_scale"].shape == (1, 64)
    assert r1[p + "attention.dense.smoother"].shape == (1, 32) and r1[p + "attention.dense.per_channel_scale"].shape == (1, 128)
    assert r1[p + "mlp.fc.weight"].shape == (64, 128) and r1[p + "mlp.proj.weight"].shape == (128, 64)
    assert r1[p + "input_layernorm.scale_to_int"].shape == (1,)
    assert r1[p + "attention.kv_cache_scaling_factor"].dtype == torch.float32
    assert r1["lm_head.weight"].shape == (2048, 128) and r1["transformer.vocab_embedding.weight"].shape == (2048, 128)
    qm = QuantizedModel(quantized("llama", "w8a8-sq-pertoken"))
    k_amax, v_amax = qm.kv_amax()[0]
    assert float(r1[p + "attention.kv_cache_scaling_factor"]) == pytest.approx(max(k_amax, v_amax) / 127, rel=1e-6)
    # rank 1 holds KV head 0 (ranks 0, 1 share it): q heads 2, 3 read KV head 0
    ck = TrtllmCheckpoint(out)
    torch.testing.assert_close(ck.rank_linear(1, 0, "k").q, ck.rank_linear(0, 0, "k").q)
    assert not torch.equal(ck.rank_linear(2, 0, "k").q, ck.rank_linear(0, 0, "k").q)


def test_mlp_fc_holds_gate_proj(quantized, tmp_path):
    """TensorRT-LLM's GatedMLP is proj(act(fc(x)) * gate(x)): fc = HF gate_proj, gate = HF up_proj."""
    qdir = quantized("llama", "fp16")
    out = tmp_path / "ckpt"
    export(qdir, out, 1)
    r0 = load_file(str(out / "rank0.safetensors"))
    qm = QuantizedModel(qdir)
    torch.testing.assert_close(r0["transformer.layers.1.mlp.fc.weight"].float(), qm.get("layers.1.gate.weight"))
    torch.testing.assert_close(r0["transformer.layers.1.mlp.gate.weight"].float(), qm.get("layers.1.up.weight"))
    assert torch.equal(r0["lm_head.weight"], r0["lm_head.weight"])  # written although untied models have it anyway


def test_opt_drops_position_offset_and_keeps_biases(quantized, tmp_path):
    qdir = quantized("opt", "w8a8-sq")
    out = tmp_path / "ckpt"
    export(qdir, out, 2)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["do_layer_norm_before"] is True and cfg["intermediate_size"] == 256 and "rotary_base" not in cfg
    r0, r1 = (load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1))
    qm = QuantizedModel(qdir)
    pos = qm.get("pos_embed.weight")[2:]  # HF's 2 unused rows dropped
    torch.testing.assert_close(torch.cat([r0["transformer.position_embedding.weight"], r1["transformer.position_embedding.weight"]]).float(), pos)
    assert torch.equal(r0["transformer.layers.0.attention.dense.bias"], r1["transformer.layers.0.attention.dense.bias"])
    assert r0["transformer.layers.0.mlp.fc.bias"].shape == (128,) and "transformer.ln_f.bias" in r0
    # tied embeddings: lm_head is written all the same
    torch.testing.assert_close(torch.cat([r0["lm_head.weight"], r1["lm_head.weight"]]), torch.cat([r0["transformer.vocab_embedding.weight"], r1["transformer.vocab_embedding.weight"]]))


# ----------------------------------------------------------------------------- INT4
INT4_SPEC = dict(TINY_CONFIGS["llama"], hidden_size=512, intermediate_size=1024, head_dim=64)


@pytest.fixture(scope="module")
def int4_model(tmp_path_factory):
    """Hidden 512, group 64: INT4 splits TensorRT-LLM can load at tp 8 (multiples of 64 * 8)."""
    return make_random_model(INT4_SPEC, tmp_path_factory.mktemp("int4") / "m", tokenizer_from=None)


def _g64(name: str):
    d = load_recipe(name).to_dict()
    d["scheme"]["weight"]["group_size"] = 64
    d["algorithm"] = {k: v for k, v in d["algorithm"].items() if k != "name"} | {"name": d["algorithm"]["name"]}
    return parse_recipe({k: d[k] for k in ("name", "scheme", "algorithm", "calibration")}, origin=name)


def _symmetric_reference(qdir):
    """Independent re-derivation: source weights, recorded smoothing folded, symmetric INT4 g64."""
    from sqdeploy.exporter import qmath
    from sqdeploy.exporter.schemes import WeightScheme

    qm = QuantizedModel(qdir)
    sm = SmoothedWeights(qm)
    assert sm.available, sm.reason
    model = load_model(qm)
    ws = WeightScheme(4, "group", 64, symmetric=True)
    for i, block in enumerate(model.layers):
        for name, w in sm.layer(i).items():
            block.linear(name).weight.data = qmath.fake_quant_weight(w, ws)
    return model


def test_int4_awq_symmetric_requant_every_tp(int4_model, quantized, tmp_path):
    qdir = quantized(int4_model, _g64("w4a16-awq"), "awq-g64")
    with torch.no_grad():
        ref = _symmetric_reference(qdir)(IDS)
    for tp in TPS:
        out = tmp_path / f"tp{tp}"
        report = export(qdir, out, tp)
        assert report["requantized_from"] == "smoothed float weights"
        cfg = json.loads((out / "config.json").read_text())["quantization"]
        assert cfg == {"quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": None, "group_size": 64, "has_zero_point": False,
                       "pre_quant_scale": True, "exclude_modules": ["lm_head", "*vocab_embedding", "*position_embedding"]}
        ck = TrtllmCheckpoint(out)
        torch.testing.assert_close(_logits(ck), ref, rtol=0, atol=1e-5)
        if tp in (1, 8):
            assert check_dir(out).ok
            with torch.no_grad():
                torch.testing.assert_close(tp_forward(ck, IDS), ref, rtol=1e-5, atol=1e-5)
    r0 = load_file(str(tmp_path / "tp8" / "rank0.safetensors"))
    p = "transformer.layers.0.attention."
    # qkv per rank (1 q head + 2 duplicated KV heads) * 64 rows, packed two per byte
    assert r0[p + "qkv.weight"].shape == (96, 512) and r0[p + "qkv.weight"].dtype == torch.int8
    assert r0[p + "qkv.weights_scaling_factor"].shape == (192, 8) and r0[p + "qkv.prequant_scaling_factor"].shape == (512,)
    assert r0[p + "dense.weight"].shape == (256, 64) and r0[p + "dense.weights_scaling_factor"].shape == (512, 1)


def test_int4_zero_point_is_exact_and_experimental(int4_model, quantized, tmp_path):
    qdir = quantized(int4_model, _g64("w4a16-awq"), "awq-g64")
    ref = _logits(QuantizedModel(qdir))
    out = tmp_path / "zp"
    export(qdir, out, 2, zero_point=True)
    assert json.loads((out / "config.json").read_text())["quantization"]["has_zero_point"] is True
    r0 = load_file(str(out / "rank0.safetensors"))
    assert r0["transformer.layers.0.mlp.proj.zero"].shape == (8, 512)  # engine layout [in / group, out]
    torch.testing.assert_close(_logits(TrtllmCheckpoint(out)), ref, rtol=1e-5, atol=1e-5)


def test_int4_packing_low_nibble_is_even_row():
    q = torch.tensor([[1, -8], [-1, 7], [3, 0], [-4, 5]], dtype=torch.int8)
    packed = pack_int4_rows(q)
    assert packed.dtype == torch.int8 and packed.shape == (2, 2)
    assert packed.view(torch.uint8)[0].tolist() == [0x1 | (0xF << 4), 0x8 | (0x7 << 4)]
    assert torch.equal(unpack_int4_rows(packed), q)
    r = torch.randint(-8, 8, (64, 48), dtype=torch.int8)
    assert torch.equal(unpack_int4_rows(pack_int4_rows(r)), r)


def test_trtllm_weight_only_rounding():
    """trtllm-build's symmetric_quantize: scale = amax / 128 per output row, round half away from zero, clamp."""
    w = torch.tensor([[1.28, -0.005, 0.015, -1.28], [0.0, 0.0, 0.0, 0.0]])
    q, s = trtllm_weight_only(w, 8, torch.float32)
    assert torch.allclose(s, torch.tensor([0.01, 0.0]))
    assert q.tolist() == [[127, -1, 2, -128], [0, 0, 0, 0]]  # 1.28 / 0.01 = 128 clamps to 127; -0.5 -> -1; 1.5 -> 2


def test_w8a16_writes_float_weights_trtllm_quantizes(quantized, tmp_path):
    qdir = quantized("llama", "w8a16-rtn")
    out = tmp_path / "ckpt"
    report = export(qdir, out, 1)
    assert report["requantized_from"] == "smoothed float weights"
    r0 = load_file(str(out / "rank0.safetensors"))
    assert r0["transformer.layers.0.attention.qkv.weight"].dtype == torch.float32  # the tiny model's dtype
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["exclude_modules"] == ["lm_head", "*vocab_embedding", "*position_embedding"]
    ck = TrtllmCheckpoint(out)
    lin = ck.rank_linear(0, 0, "q")
    assert lin.q.dtype == torch.int8 and lin.scale.shape == (128,)
    # the read-back model is close to the recipe's own INT8 (different rounding, same grid size)
    torch.testing.assert_close(_logits(ck), _logits(QuantizedModel(qdir)), rtol=0, atol=0.05)
