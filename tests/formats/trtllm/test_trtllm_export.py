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

from sqdeploy.core.errors import SqDeployError
from sqdeploy.formats.trtllm.check import check_dir
from sqdeploy.formats.trtllm.linear import trtllm_weight_only
from sqdeploy.formats.trtllm.pack import pack_int4_rows, unpack_int4_rows
from sqdeploy.formats.trtllm.reader import TrtllmCheckpoint
from sqdeploy.model.loading import load_model
from sqdeploy.quantize.pipeline import Calibration, Runtime, quantize_to_dir
from sqdeploy.quantize.qmodel import QuantizedModel
from sqdeploy.testing.random_model import TINY_CONFIGS, make_random_model
from tests.conftest import SHARED_MODEL
from tests.formats.trtllm.test_trtllm_support import (
    SQ_STATIC,
    SQ_TOKEN,
    export,
    int4_recipe,
    per_rank_token_reference,
    recipe,
    tp_forward,
)

TPS = (1, 2, 4, 8)
IDS = torch.randint(0, 8000, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny_models, calib_file):
    """(family or model dir, recipe) -> quantized directory, made once."""
    root, made = tmp_path_factory.mktemp("trtllm-q"), {}

    def get(model, spec):
        key = (str(model), spec if isinstance(spec, str) else spec["name"] + str(spec["scheme"]))
        if key not in made:
            src = tiny_models[model] if model in tiny_models else model
            out = root / f"q{len(made)}"
            quantize_to_dir(src, recipe(spec), out, Calibration(str(calib_file), 4, 64), Runtime(progress=False), keep_source=True)
            made[key] = out
        return made[key]

    return get


def _logits(src) -> torch.Tensor:
    with torch.no_grad():
        return load_model(src)(IDS)


# Llama (GQA: KV heads split at tp 2, duplicated at tp 4 and 8) and OPT (biases, learned
# positions) go through every tp; Mistral and Qwen2 (q/k/v biases) share Llama's layout and
# are checked at tp 2.
FULL_TPS = {"llama": TPS, "opt": TPS, "mistral": (2,), "qwen2": (2,)}
MATRIX = {  # recipe -> tensor-parallel sizes per family
    "w8a8-static": (SQ_STATIC, FULL_TPS),
    "w8a8-per-token": (SQ_TOKEN, {"llama": (1, 2, 8), "opt": (1, 2, 8), "mistral": (2,), "qwen2": (2,)}),
    "fp16": ("fp16", {"llama": (8,), "opt": (8,), "mistral": (2,), "qwen2": (2,)}),
}


@pytest.mark.parametrize("name", sorted(MATRIX))
@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_export_reads_back_exactly_at_every_tp(family, name, quantized, tmp_path):
    spec, tps = MATRIX[name][0], MATRIX[name][1][family]
    qdir = quantized(family, spec)
    for tp in tps:
        out = tmp_path / f"tp{tp}"
        export(qdir, out, tp)
        assert check_dir(out).ok, check_dir(out).table()
        ck = TrtllmCheckpoint(out)
        merged = _logits(ck)
        with torch.no_grad():
            # per-token recipes: each rank quantizes its own slice of the o/down inputs
            ref = per_rank_token_reference(load_model(QuantizedModel(qdir)), tp)(IDS)
            ranks = tp_forward(ck, IDS)
        torch.testing.assert_close(merged, ref, rtol=0, atol=1e-5)
        if spec == "fp16":
            torch.testing.assert_close(ranks, merged, rtol=1e-5, atol=1e-5)
        else:
            # Rank by rank, as a tensor-parallel engine runs it: summing partial outputs rounds
            # differently in float32, which can flip an INT8 activation by one step.
            _close_quantized(ranks, merged)


def _close_quantized(a: torch.Tensor, b: torch.Tensor, mean: float = 2e-3) -> None:
    """Equal up to a few one-step flips of quantized activations (a wrong head or scale is O(1) off)."""
    rel = float((a - b).abs().mean() / b.abs().mean())
    assert rel < mean, f"mean relative difference {rel:.2e} >= {mean:.0e}"


def test_per_token_scales_are_per_rank(quantized, tmp_path):
    """The per-rank reference is not the whole-row one: the test above would see a reader that
    quantized the o/down inputs over whole rows."""
    qdir = quantized("llama", SQ_TOKEN)
    export(qdir, tmp_path / "tp2", 2)
    with torch.no_grad():
        merged = _logits(TrtllmCheckpoint(tmp_path / "tp2"))
        whole = _logits(QuantizedModel(qdir))
    assert float((merged - whole).abs().max()) > 1e-3


def test_sq_eval_opens_a_checkpoint(quantized, tmp_path):
    """sq-eval's reader registry recognizes the directory and runs the merged reader."""
    from sqdeploy.formats.readers import open_model

    qdir = quantized("llama", SQ_STATIC)
    export(qdir, tmp_path / "ckpt", 2)
    opened = open_model(tmp_path / "ckpt")
    assert opened.kind == "trtllm" and "W8A8_SQ_PER_CHANNEL" in opened.description
    with torch.no_grad():
        torch.testing.assert_close(opened.logits_fn(IDS), _logits(QuantizedModel(qdir)), rtol=0, atol=1e-5)


def test_sq_eval_pairs_a_checkpoint_with_its_quantized_dir(quantized, tmp_path, calib_file, capsys):
    """``sq-eval QDIR CKPT ...`` scores each on the same windows, with the change's paired standard error:
    zero for an exact export, non-zero where TensorRT-LLM rounds per rank."""
    from sqdeploy.cli.eval import main as eval_main

    qdir = quantized("llama", SQ_TOKEN)
    export(qdir, tmp_path / "tp1", 1)
    export(qdir, tmp_path / "tp2", 2)
    text, js = tmp_path / "t.txt", tmp_path / "r.json"
    text.write_text(calib_file.read_text() * 4)
    args = [str(qdir), str(tmp_path / "tp1"), str(tmp_path / "tp2"), "--text", str(text), "--windows", "4", "--seq-len", "64"]
    assert eval_main([*args, "--json", str(js), "--quiet"]) == 0
    first, tp1, tp2 = json.loads(js.read_text())["results"]
    assert first["delta_vs_first_stderr"] is None and len(first["per_window_nll"]) == 4
    assert tp1["per_window_nll"] == first["per_window_nll"] and tp1["delta_vs_first"] == 0 == tp1["delta_vs_first_stderr"]
    assert tp2["per_window_nll"] != first["per_window_nll"] and tp2["delta_vs_first_stderr"] > 0
    assert "± 0.00%" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        eval_main([*args, "--recipe", "w8a8-sq"])
    with pytest.raises(SqDeployError, match="nope does not exist"):
        eval_main([str(qdir), str(tmp_path / "nope"), "--text", str(text)])


def test_config_and_layout_follow_tensorrt_llm(quantized, tmp_path):
    """Llama/GQA at tp 4: fused qkv rows per rank, KV heads split, padded lm_head, plugin names."""
    out = tmp_path / "ckpt"
    export(quantized("llama", SQ_TOKEN), out, 4, kv_cache="int8")
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
    qm = QuantizedModel(quantized("llama", SQ_TOKEN))
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
    qdir = quantized("opt", SQ_STATIC)
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
    return make_random_model(INT4_SPEC, tmp_path_factory.mktemp("int4") / "m", tokenizer_from=SHARED_MODEL)


def test_int4_symmetric_requant_every_tp(int4_model, quantized, tmp_path):
    """An asymmetric recipe is re-quantized symmetric from its smoothed float weights: exactly
    what the same recipe with a symmetric scheme produces (same smoothing, same rounding)."""
    qdir = quantized(int4_model, int4_recipe(64))
    ref = _logits(QuantizedModel(quantized(int4_model, int4_recipe(64, symmetric=True))))
    for tp in TPS:
        out = tmp_path / f"tp{tp}"
        report = export(qdir, out, tp)
        assert report["requantized_from"] == "smoothed float weights" and report["requant_rounding"] == "rtn"
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


def test_eval_text_reports_both_models_and_their_paired_error(int4_model, quantized, tmp_path, calib_file):
    """``--eval-text``: the re-quantized checkpoint next to the asymmetric model it came from, on the same windows."""
    text = tmp_path / "t.txt"
    text.write_text(calib_file.read_text() * 4)
    report = export(quantized(int4_model, int4_recipe(64)), tmp_path / "ck", 1, eval_text=str(text), eval_windows=3)
    ppl = report["perplexity"]
    quantized_ppl, checkpoint_ppl = ppl["values"].values()
    assert quantized_ppl != checkpoint_ppl and ppl["relative_difference"] == pytest.approx(checkpoint_ppl / quantized_ppl - 1)
    assert ppl["relative_difference_stderr"] > 0 and "paired s.e., 3 windows" in report["summary"]


def test_int4_gptq_recipe_is_requantized_with_gptq(quantized, tmp_path):
    """A GPTQ recipe's re-quantization re-runs GPTQ on the recorded calibration set with the
    recorded smoothing and column order: the same integers as the recipe with a symmetric scheme.
    (Tiny Llama at tp 1, where group 64 fits: GPTQ happens before the split, which the test above covers.)"""
    qdir = quantized("llama", int4_recipe(64, rounding="gptq", act_order=True))
    sym = QuantizedModel(quantized("llama", int4_recipe(64, symmetric=True, rounding="gptq", act_order=True)))
    report = export(qdir, tmp_path / "ckpt", 1, int4_requant_clip="none")
    assert report["requant_rounding"] == "gptq" and not report["requant_clip_search"] and not report["notes"]
    ck = TrtllmCheckpoint(tmp_path / "ckpt")
    for i in range(sym.config.num_layers):
        for name in sym.config.linears:
            assert torch.equal(ck.rank_linear(0, i, name).q, sym.qweight(i, name).q), (i, name)
    torch.testing.assert_close(_logits(ck), _logits(sym), rtol=0, atol=1e-5)
    # the default also searches clipping for the symmetric grid: other integers, closer to the smoothed float model
    clipped = export(qdir, tmp_path / "clipped", 1)
    assert clipped["requant_clip_search"]
    ckc = TrtllmCheckpoint(tmp_path / "clipped")
    for name in ("q", "k", "down"):  # q/k too, unlike AWQ's own clipping
        assert not torch.equal(ckc.rank_linear(0, 0, name).q, sym.qweight(0, name).q), name
    ref = _logits(QuantizedModel(quantized("llama", "fp16")))
    assert (_logits(ckc) - ref).norm() < (_logits(ck) - ref).norm()


def test_int4_gptq_requantization_runs_on_the_export_device(quantized, tmp_path, monkeypatch):
    """The re-quantization's calibration pass runs where the export runs (``--device``), not on the CPU
    whatever was asked; the integers it hands the writer are on the host."""
    import sqdeploy.quantize.streaming as streaming
    from sqdeploy.formats.export import export as export_api
    from sqdeploy.formats.trtllm.options import TrtllmOptions
    from sqdeploy.quantize.pipeline import Runtime as Rt

    qdir = quantized("llama", int4_recipe(64, rounding="gptq", act_order=True))
    asked, original = [], streaming.stream_layers

    def spy(src, ids, algorithm, device="cpu", *args):
        asked.append(str(device))
        return original(src, ids, algorithm, "cpu", *args)  # this machine has only the CPU

    monkeypatch.setattr(streaming, "stream_layers", spy)
    export_api(qdir, TrtllmOptions(tp=1, int4_requant_clip="none"), tmp_path / "ckpt", runtime=Rt(device="cuda:3", progress=False))
    assert asked == ["cuda:3"]


def test_int4_symmetric_recipe_keeps_its_integers(int4_model, quantized, tmp_path):
    qdir = quantized(int4_model, int4_recipe(64, symmetric=True))
    out = tmp_path / "sym"
    assert export(qdir, out, 2)["requantized_from"] is None
    torch.testing.assert_close(_logits(TrtllmCheckpoint(out)), _logits(QuantizedModel(qdir)), rtol=0, atol=1e-5)


def test_int4_zero_point_is_exact_and_experimental(int4_model, quantized, tmp_path):
    qdir = quantized(int4_model, int4_recipe(64))
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


# ----------------------------------------------------------------------------- unified HF
def _export_hf(qdir, out):

    from sqdeploy.formats.trtllm.hf_unified import write as write_hf

    out.mkdir()
    return write_hf(qdir, out, progress=False)


def test_hf_unified_int4_reads_back_like_the_engine_checkpoint(int4_model, quantized, tmp_path):
    from sqdeploy.formats.readers import open_model

    qdir = quantized(int4_model, int4_recipe(64))
    _export_hf(qdir, tmp_path / "hf")
    export(qdir, tmp_path / "ckpt", 1)
    hq = json.loads((tmp_path / "hf" / "hf_quant_config.json").read_text())["quantization"]
    assert hq == {"quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": None, "group_size": 64, "has_zero_point": False,
                  "pre_quant_scale": True, "exclude_modules": ["lm_head", "model.embed_tokens"]}
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "modelopt" and cfg["quant_algo"] == "W4A16_AWQ"
    t = load_file(str(tmp_path / "hf" / "model.safetensors"))
    p = "model.layers.0."
    assert t[p + "self_attn.q_proj.weight"].dtype == torch.uint8 and t[p + "self_attn.q_proj.weight"].shape == (256, 512)
    assert t[p + "mlp.down_proj.weight_scale"].shape == (512, 16) and p + "mlp.down_proj.pre_quant_scale" in t
    assert p + "self_attn.q_proj.pre_quant_scale" not in t  # fused q/k/v: their smoothing is in the norm
    opened = open_model(tmp_path / "hf")
    assert opened.kind == "trtllm-hf"
    with torch.no_grad():
        torch.testing.assert_close(opened.logits_fn(IDS), _logits(TrtllmCheckpoint(tmp_path / "ckpt")), rtol=0, atol=1e-5)


def test_hf_unified_fp16_is_a_plain_hf_checkpoint(quantized, tmp_path):
    from transformers import AutoModelForCausalLM

    qdir = quantized("llama", "fp16")
    _export_hf(qdir, tmp_path / "hf")
    assert not (tmp_path / "hf" / "hf_quant_config.json").exists()
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, _logits(QuantizedModel(qdir)), rtol=1e-5, atol=1e-5)
