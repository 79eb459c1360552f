"""sq-build --engine trtllm: the exact trtllm-build command, flag by flag, per quant_algo and tp."""

from __future__ import annotations

import json
import shlex

import pytest

from sqdeploy.cli.build import main as build_main
from sqdeploy.cli.common import run_cli
from sqdeploy.core.errors import MissingDependencyError, SqDeployError
from sqdeploy.engines import gpus, trtllm
from sqdeploy.engines.gpus import get_gpu
from sqdeploy.engines.trtllm import TrtllmOptions, plan_build

# every flag trtllm-build (0.12 .. 1.2) accepts that a plan may use; the quantization plugins are not flags
TRTLLM_BUILD_FLAGS = {
    "--checkpoint_dir", "--output_dir", "--workers", "--gemm_plugin", "--gpt_attention_plugin", "--kv_cache_type",
    "--context_fmha", "--use_paged_context_fmha", "--remove_input_padding", "--max_batch_size", "--max_input_len",
    "--max_seq_len", "--max_num_tokens", "--max_beam_width",
}
PLUGIN = {
    None: "no quantization plugin",
    "W8A8_SQ_PER_CHANNEL": "no plugin: TensorRT's native INT8 Q/DQ",
    "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN": "smooth_quant_gemm_plugin",
    "W8A16": "weight_only_quant_matmul_plugin = float16",
    "W4A16_AWQ": "weight_only_groupwise_quant_matmul_plugin = float16",
}


def write_ckpt(path, algo=None, kv=None, tp=1, dtype="float16", **extra):
    """A minimal valid TensorRT-LLM checkpoint config.json (spec section 2) for the shared model's shape."""
    quant = {"quant_algo": algo, "kv_cache_quant_algo": kv}
    if algo == "W4A16_AWQ":
        quant.update(group_size=64, has_zero_point=False, pre_quant_scale=True, exclude_modules=["lm_head", "*vocab_embedding"])
    cfg = {"architecture": "LlamaForCausalLM", "dtype": dtype, "num_hidden_layers": 12, "num_attention_heads": 6,
           "num_key_value_heads": 2, "hidden_size": 384, "vocab_size": 8192, "max_position_embeddings": 1024,
           "hidden_act": "silu", "head_size": 64, "intermediate_size": 1024, "norm_epsilon": 1e-5,
           "position_embedding_type": "rope_gpt_neox", "rotary_base": 10000.0, "use_parallel_embedding": True,
           "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1}, "quantization": quant, **extra}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def flags(cmd):
    assert cmd[0] == "trtllm-build"
    pairs = dict(zip(cmd[1::2], cmd[2::2]))
    assert len(pairs) * 2 == len(cmd) - 1
    return pairs


@pytest.mark.parametrize("kv", [None, "INT8"])
@pytest.mark.parametrize("algo,tp", [(None, 1), (None, 2), ("W8A8_SQ_PER_CHANNEL", 2), ("W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", 1),
                                     ("W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", 2), ("W8A16", 2), ("W4A16_AWQ", 1)])
def test_command_flag_by_flag(tmp_path, algo, kv, tp):
    ckpt = write_ckpt(tmp_path / "ckpt", algo, kv, tp)
    plan = plan_build(ckpt, tmp_path / "eng", TrtllmOptions(gpu=get_gpu("a100-80g")))
    f = flags(list(plan.command))
    assert set(f) <= TRTLLM_BUILD_FLAGS
    assert f["--checkpoint_dir"] == str(ckpt) and f["--output_dir"] == str(tmp_path / "eng")
    assert f["--workers"] == str(tp)
    assert f["--gemm_plugin"] == f["--gpt_attention_plugin"] == "float16"
    assert f["--kv_cache_type"] == "paged" and f["--context_fmha"] == "enable" and f["--remove_input_padding"] == "enable"
    assert f["--use_paged_context_fmha"] == ("disable" if kv == "INT8" else "enable")
    assert (f["--max_batch_size"], f["--max_input_len"], f["--max_seq_len"], f["--max_num_tokens"]) == ("64", "512", "1024", "8192")
    auto = "\n".join(plan.automatic)
    assert PLUGIN[algo] in auto
    assert ("nccl_plugin" in auto) == (tp > 1)
    assert plan.memory.fits and plan.memory.kv_bytes_per_token == 2 * 12 * (2 // tp) * 64 * (1 if kv else 2)


def test_dry_run_prints_the_exact_command(tmp_path, capsys):
    ckpt = write_ckpt(tmp_path / "ckpt", tp=2, dtype="bfloat16")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    assert build_main(["--engine", "trtllm", str(ckpt), "--out", str(tmp_path / "eng"), "--dry-run", "--gpu", "a100-40g",
                       "--max-seq-len", "1024", "--max-input-len", "256", "--max-batch-size", "8",
                       "--tokenizer", str(tmp_path / "tok"), "--json", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    expected = (f"trtllm-build --checkpoint_dir {ckpt} --output_dir {tmp_path / 'eng'} --workers 2 --gemm_plugin bfloat16 "
                "--gpt_attention_plugin bfloat16 --kv_cache_type paged --context_fmha enable --use_paged_context_fmha enable "
                "--remove_input_padding enable --max_batch_size 8 --max_input_len 256 --max_seq_len 1024 "
                "--max_num_tokens 8192 --max_beam_width 1")
    assert expected in out and "tokenizer: tokenizer.json" in out and "a100-40g" in out
    assert shlex.split(expected) == json.loads((tmp_path / "plan.json").read_text())["plan"]["command"]
    assert not (tmp_path / "eng").exists()


@pytest.mark.parametrize("change,message", [
    ({"quantization": {"quant_algo": "FP8"}}, "FP8 needs Ada or Hopper"),
    ({"quantization": {"quant_algo": "W4A8_AWQ"}}, "quant_algo 'W4A8_AWQ' is not supported"),
    ({"mapping": {"world_size": 4, "tp_size": 2, "pp_size": 1}}, "world_size 4 != tp_size 2"),
    ({"architecture": "GPT2LMHeadModel"}, "architecture 'GPT2LMHeadModel' is not supported"),
    ({"num_hidden_layers": 4000, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
      "num_key_value_heads": 8, "head_size": 128}, "does not fit 1 x a100-80g: weights"),
])
def test_bad_checkpoints(tmp_path, change, message):
    ckpt = write_ckpt(tmp_path / "ckpt")
    cfg = {**json.loads((ckpt / "config.json").read_text()), **change}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SqDeployError, match=message):
        plan_build(ckpt, tmp_path / "eng", TrtllmOptions(gpu=get_gpu("a100-80g")))


def test_bad_limits_and_missing_dir(tmp_path, capsys):
    ckpt = write_ckpt(tmp_path / "ckpt")
    with pytest.raises(SqDeployError, match="exceeds the model's 1024 positions"):
        plan_build(ckpt, tmp_path / "e", TrtllmOptions(gpu=get_gpu("h200"), max_seq_len=2048))
    with pytest.raises(SqDeployError, match="at least --max-input-len 512"):
        plan_build(ckpt, tmp_path / "e", TrtllmOptions(gpu=get_gpu("h200"), max_num_tokens=256))
    assert run_cli(build_main, ["--engine", "trtllm", str(tmp_path / "nope"), "--out", str(tmp_path / "e"), "--dry-run"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_version_gate(monkeypatch):
    monkeypatch.setattr(trtllm.importlib.util, "find_spec", lambda name: object())
    for version, ok in (("1.2.1", True), ("0.15.0", True), ("1.3.0rc2", False), ("2.0.0", False), ("0.11.0", False)):
        monkeypatch.setattr(trtllm.importlib.metadata, "version", lambda name, v=version: v)
        if ok:
            assert trtllm.installed_version() == version
        else:
            with pytest.raises(SqDeployError, match="trtllm-hf" if version >= "1" else "older than 0.12"):
                trtllm.installed_version()


def test_missing_tensorrt_llm_is_a_clear_error(tmp_path):
    if trtllm.importlib.util.find_spec("tensorrt_llm") is not None:
        pytest.skip("tensorrt_llm is installed here")
    ckpt = write_ckpt(tmp_path / "ckpt")
    plan = plan_build(ckpt, tmp_path / "eng", TrtllmOptions(gpu=get_gpu("a100-80g")))
    with pytest.raises(MissingDependencyError, match="sq-deploy\\[trtllm\\]"):
        trtllm.run_build(plan, tmp_path)


def test_gpu_and_rank_checks(tmp_path, monkeypatch):
    monkeypatch.setattr(gpus, "visible_gpus", lambda: [("NVIDIA A100-SXM4-80GB", 80)])
    with pytest.raises(SqDeployError, match="needs 2 GPU"):
        gpus.check_visible_gpus(2, get_gpu("a100-80g"), "building")
    with pytest.raises(SqDeployError, match="sm90 but GPU 'NVIDIA A100-SXM4-80GB' is sm80"):
        gpus.check_visible_gpus(1, get_gpu("h100-80g"), "building")
    gpus.check_visible_gpus(1, get_gpu("a100-40g"), "building")
    ckpt = write_ckpt(tmp_path / "ckpt", tp=2)
    (ckpt / "rank0.safetensors").write_bytes(b"")
    with pytest.raises(SqDeployError, match="lacks rank1.safetensors"):
        trtllm.check_checkpoint(ckpt, 2)


def test_old_cli_spelling():
    cmd = ["trtllm-build", "--kv_cache_type", "paged", "--workers", "1"]
    assert trtllm._adapt_to_cli(list(cmd), "--paged_kv_cache --workers") == ["trtllm-build", "--paged_kv_cache", "enable", "--workers", "1"]
    with pytest.raises(SqDeployError, match="does not accept --workers"):
        trtllm._adapt_to_cli(list(cmd), "--kv_cache_type")
