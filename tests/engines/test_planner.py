"""The memory planner against hand-computed byte counts and the papers' GPU-count claims."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sqdeploy.cli.build import main as build_main
from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.families import ModelConfig
from sqdeploy.engines.gpus import GIB, get_gpu
from sqdeploy.engines.model_shape import WeightFormat, config_from_hf, config_from_trtllm, quantization_for_scheme
from sqdeploy.engines.planner import Deployment, min_gpus, plan_memory, tp_problems, weight_bytes
from sqdeploy.quantize.recipes import load_recipe

DATA = Path(__file__).resolve().parents[1] / "data"


def shape(name: str) -> ModelConfig:
    return config_from_hf(json.loads((DATA / f"{name}.config.json").read_text()), dtype="float16")


def fmt(recipe: str, s: ModelConfig, kv: str | None = None, zero_point: bool = False) -> WeightFormat:
    return WeightFormat.from_trtllm(quantization_for_scheme(load_recipe(recipe).scheme, kv, zero_point), s.dtype)


def test_codellama_fp16_tp2_weights_by_hand():
    s = shape("codellama-34b")
    w = weight_bytes(s, fmt("fp16", s), tp=2)
    # per rank and layer: qkv (32 + 2*4 heads)*128 x 8192, dense 8192 x 4096, fc/gate/proj 11008 x 8192
    per_layer = 5120 * 8192 + 8192 * 4096 + 3 * 11008 * 8192
    assert w["linear weights"] == 48 * per_layer * 2 == 33_218_887_680
    assert w["embeddings"] == w["lm_head"] == 16000 * 8192 * 2
    assert w["norms"] == 97 * 8192 * 2
    assert w["scales"] == w["zero points"] == w["biases"] == 0
    plan = plan_memory(s, fmt("fp16", s), get_gpu("a100-40g"), Deployment(tp=2))
    assert plan.kv_bytes_per_token == 2 * 48 * 4 * 128 * 2


def test_codellama_w4a16_tp1_weights_by_hand():
    s = shape("codellama-34b")
    # INT4 g128, asymmetric (--int4-zero-point): fp16 scales and zeros per group
    w = weight_bytes(s, fmt("w4a16-awq", s, zero_point=True), tp=1)
    params = 48 * (10240 * 8192 + 8192 * 8192 + 3 * 22016 * 8192)
    groups = 48 * (10240 * 64 + 8192 * 64 + 2 * 22016 * 64 + 8192 * 172)
    assert w["linear weights"] == params // 2 == 16_609_443_840
    assert w["scales"] == w["zero points"] == groups * 2 == 519_045_120
    assert w["smoothing vectors"] == 48 * (3 * 8192 + 22016 + 8192) * 2  # AWQ pre_quant_scale per linear input
    assert w["embeddings"] == w["lm_head"] == 32000 * 8192 * 2


def test_opt175b_w8a8_tp4_weights_by_hand():
    s = shape("opt-175b")
    f = fmt("w8a8-sq", s)  # W8A8_SQ_PER_CHANNEL: int8 weights, f32 per-channel + activation scales, fp16 prequant
    w = weight_bytes(s, f, tp=4)
    assert w["linear weights"] == 96 * (9216 * 12288 + 12288 * 3072 + 2 * 12288 * 12288)
    assert w["scales"] == 96 * ((9216 + 3 * 12288) * 4 + 4 * 4)
    assert w["smoothing vectors"] == 96 * (12288 + 3072 + 12288 + 12288) * 2
    assert w["biases"] == 96 * (9216 + 3 * 12288) * 2  # row-parallel biases are replicated in full
    assert w["embeddings"] == (12568 + 512) * 12288 * 2  # vocab-parallel token and position tables
    assert w["lm_head"] == 12568 * 12288 * 2
    assert w["norms"] == (2 * 96 + 1) * 2 * 12288 * 2


def test_kv_capacity_and_activations_by_hand():
    s, gpu = shape("codellama-34b"), get_gpu("a100-40g")
    f = fmt("w4a16-awq", s)
    plan = plan_memory(s, f, gpu, Deployment(tp=1))
    act_tok = max(2 * 8192 + 10240 + 8192, 2 * 8192 + 3 * 22016) * 2
    assert plan.activation_bytes_per_token == act_tok
    assert plan.activation_bytes == act_tok * 8192 + 64 * 32000 * 4
    free = 40960 * 2**20 - GIB - plan.weight_bytes - plan.activation_bytes
    assert plan.kv_tokens == int(free * 0.9) // (2 * 48 * 8 * 128 * 2)
    assert plan.max_batch == plan.kv_tokens // 4096 and plan.fits


@pytest.mark.parametrize("model,gpu,recipes,expected", [
    ("codellama-34b", "a100-40g", ("w4a16-awq", "fp16"), (1, 2)),  # SmoothQuant+: one A100-40G vs two
    ("opt-175b", "a100-80g", ("w8a8-sq", "fp16"), (4, 8)),  # SmoothQuant: half the GPUs of FP16
])
def test_paper_gpu_counts(model, gpu, recipes, expected):
    s = shape(model)
    got = tuple(min_gpus(s, fmt(r, s), get_gpu(gpu), Deployment()).deployment.tp for r in recipes)
    assert got == expected


def test_tp_problems_name_the_split():
    shared = config_from_hf({"architectures": ["LlamaForCausalLM"], "hidden_size": 384, "intermediate_size": 1024,
                             "num_hidden_layers": 12, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 64,
                             "vocab_size": 8192, "max_position_embeddings": 1024})
    awq = WeightFormat.from_trtllm({"quant_algo": "W4A16_AWQ", "group_size": 128}, "float16")
    assert tp_problems(shared, awq, 1) == []
    assert "multiple of 256" in tp_problems(shared, awq, 2)[0]  # the shared model's INT4 tp2 refusal
    assert "not divisible by tp 4" in tp_problems(shared, WeightFormat.from_trtllm(None, "float16"), 4)[0]


def test_trtllm_config_reads_like_hf(shared_model):
    hf = config_from_hf(json.loads((shared_model / "config.json").read_text()))
    trt = config_from_trtllm({
        "architecture": "LlamaForCausalLM", "dtype": "float16", "num_hidden_layers": 12, "num_attention_heads": 6,
        "num_key_value_heads": 2, "hidden_size": 384, "vocab_size": 8192, "max_position_embeddings": hf.max_positions,
        "head_size": 64, "intermediate_size": 1024, "position_embedding_type": "rope_gpt_neox", "bias": False,
        "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1}})
    planned = ("family", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
               "vocab_size", "max_positions", "gated_mlp", "qkv_bias", "o_bias", "mlp_bias", "norm", "position", "dtype")
    assert [getattr(trt, f) for f in planned] == [getattr(hf, f) for f in planned]


def test_cli_plan_error_names_the_numbers(capsys):
    from sqdeploy.cli.common import run_cli

    code = run_cli(build_main, ["--plan", str(DATA / "codellama-34b.config.json"), "--gpu", "a100-40g", "--tp", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "62.85 GiB" in err and "pass --tp 2" in err
    assert build_main(["--plan", str(DATA / "codellama-34b.config.json"), "--recipe", "w4a16-sqplus", "--gpu", "a100-40g"]) == 0
    out = capsys.readouterr().out
    assert "tp 1 x a100-40g" in out and "fits" in out


def test_unfittable_auto(tmp_path):
    with pytest.raises(SqDeployError, match="does not fit even 16"):
        build_main(["--plan", str(DATA / "opt-175b.config.json"), "--tp", "auto", "--gpu", "a100-40g", "--max-seq-len", "2048",
                    "--recipe", "fp16", "--max-batch-size", "100000"])
