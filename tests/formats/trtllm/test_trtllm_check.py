"""sq-check trtllm and every refusal: bad configs, damaged ranks, impossible splits, unsafe output."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from sqdeploy.cli.check import main as check_main
from sqdeploy.cli.export import main as export_main
from sqdeploy.core.errors import SqDeployError
from sqdeploy.formats.trtllm.check import check_dir
from sqdeploy.formats.trtllm.config import QuantSpec, check_split
from sqdeploy.formats.trtllm.reader import TrtllmCheckpoint
from sqdeploy.model.checkpoint import HFCheckpoint
from sqdeploy.quantize.pipeline import Calibration, Runtime, quantize_to_dir
from tests.formats.trtllm.test_trtllm_support import SQ_STATIC, export, recipe


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_models, calib_file):
    """A valid W8A8 SmoothQuant checkpoint of the tiny Llama at tp 4 (KV heads duplicated), INT8 KV cache."""
    root = tmp_path_factory.mktemp("trtllm-check")
    q = root / "q"
    quantize_to_dir(tiny_models["llama"], recipe(SQ_STATIC), q, Calibration(str(calib_file), 4, 64), Runtime(progress=False))
    export(q, root / "ckpt", 4, kv_cache="int8")
    return root / "ckpt"


def _copy(good, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(good, dst)
    return dst


def _edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_rank(path, rank, fn):
    f = path / f"rank{rank}.safetensors"
    t = load_file(str(f))
    fn(t)
    save_file(t, str(f))


def _fails(path, check: str, detail: str):
    res = check_dir(path)
    rows = [r for r in res.rows if r[1] == "FAIL"]
    assert rows, res.table()
    assert any(check in r[0] and detail in r[2] for r in rows), res.table()
    assert check_main(["trtllm", str(path)]) == 1


def test_good_checkpoint_passes(good, capsys):
    assert check_main(["trtllm", str(good)]) == 0
    out = capsys.readouterr().out
    assert "duplicated KV heads" in out and "OK" in out and "use_paged_context_fmha disable" in out


P = "transformer.layers.0."
CONFIG_CASES = [
    (lambda c: c.update(rotary_bse=10000.0), "unknown key(s) rotary_bse"),
    (lambda c: c["quantization"].update(quant_algo="W8A8_SQ_PER_CHANNEL_PLUGIN"), "unknown quant_algo"),
    (lambda c: c["quantization"].update(quant_algo="FP8"), "not one sq-deploy reads"),
    (lambda c: c["mapping"].update(world_size=2), "world_size 2 != tp_size"),
    (lambda c: c.update(num_key_value_heads=3), "not a multiple of num_key_value_heads"),
    (lambda c: c.update(architecture="GPTForCausalLM"), "architecture 'GPTForCausalLM' is not supported"),
    (lambda c: c.update(num_attention_heads=6), "attention heads do not split over 4 ranks"),
    (lambda c: c["quantization"].update(foo=1), "unknown key(s) foo in quantization"),
    (lambda c: c.pop("vocab_size"), "required key 'vocab_size' is missing"),
]


@pytest.mark.parametrize("edit,msg", CONFIG_CASES)
def test_bad_config_is_refused(good, tmp_path, edit, msg):
    path = _copy(good, tmp_path)
    _edit_config(path, edit)
    _fails(path, "config.json", msg)
    with pytest.raises(SqDeployError, match="config.json"):
        TrtllmCheckpoint(path)


TENSOR_CASES = [
    (lambda t: t.pop(P + "attention.qkv.weights_scaling_factor"), "rank1 names", "missing"),
    (lambda t: t.update({P + "attention.qkv.prequant_scale": torch.ones(128, dtype=torch.float32)}), "rank1 names", "unexpected"),
    (lambda t: t.update({P + "attention.qkv.weight": t[P + "attention.qkv.weight"][:-1]}), "rank1 shapes", "attention.qkv.weight"),
    (lambda t: t.update({P + "mlp.fc.weights_scaling_factor": t[P + "mlp.fc.weights_scaling_factor"].half()}), "rank1 dtypes", "want float32"),
    (lambda t: t[P + "input_layernorm.weight"].__setitem__(3, float("nan")), "rank1 values", "NaN"),
    (lambda t: t[P + "mlp.proj.activation_scaling_factor"].__setitem__(0, 0.0), "rank1 values", "scale <= 0"),
    (lambda t: t[P + "attention.dense.weights_scaling_factor"].mul_(2), "replicated tensors", "attention.dense.weights_scaling_factor"),
]


@pytest.mark.parametrize("edit,check,detail", TENSOR_CASES)
def test_damaged_rank_is_refused(good, tmp_path, edit, check, detail):
    path = _copy(good, tmp_path)
    _edit_rank(path, 1, edit)
    _fails(path, check, detail)


def test_duplicated_kv_heads_must_agree(good, tmp_path):
    path = _copy(good, tmp_path)

    def flip(t):  # rank 1 shares KV head 0 with rank 0; change one K row there
        w = t[P + "attention.qkv.weight"]
        w[32] = -w[32].clamp(-127, 127)

    _edit_rank(path, 1, flip)
    _fails(path, "duplicated KV heads", "layer 0 k rank 1")


def test_vocab_padding_must_be_zero(tiny_models, tmp_path):
    """8192 rows over 3... use a vocab that does not divide: 8190 over tp 4 pads 2 rows on the last rank."""
    from sqdeploy.testing.random_model import make_random_model

    m = make_random_model("llama", tmp_path / "m", vocab_size=8190)
    q = tmp_path / "q"
    quantize_to_dir(m, "fp16", q, Calibration(), Runtime(progress=False))
    out = tmp_path / "ckpt"
    export(q, out, 4)
    r3 = load_file(str(out / "rank3.safetensors"))
    assert r3["lm_head.weight"].shape == (2048, 128) and r3["lm_head.weight"][-2:].abs().sum() == 0
    assert check_dir(out).ok
    _edit_rank(out, 3, lambda t: t["lm_head.weight"][-1].fill_(0.5))
    _fails(out, "rank3 values", "padding rows (beyond 8190)")


def test_missing_and_extra_rank_files(good, tmp_path):
    path = _copy(good, tmp_path)
    (path / "rank3.safetensors").unlink()
    _fails(path, "rank files", "missing rank3.safetensors")
    with pytest.raises(SqDeployError, match="missing rank3.safetensors"):
        TrtllmCheckpoint(path)
    path2 = _copy(good, tmp_path / "b")
    shutil.copy(path2 / "rank0.safetensors", path2 / "rank4.safetensors")
    _fails(path2, "rank files", "unexpected rank4.safetensors")


def test_truncated_rank_and_missing_dir(good, tmp_path):
    path = _copy(good, tmp_path)
    data = (path / "rank2.safetensors").read_bytes()
    (path / "rank2.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SqDeployError, match="truncated"):
        check_dir(path)
    with pytest.raises(SqDeployError, match="not a directory"):
        check_dir(tmp_path / "nope")


def test_export_refusals_happen_before_any_work(tiny_models, tmp_path, calib_file):
    m = str(tiny_models["llama"])
    cases = [
        (["--recipe", "w8a8-sq", "--tp", "3"], "--tp 3 is not possible for this model: 8 attention heads do not split over 3 ranks"),
        (["--recipe", "w8a8-sq", "--pp", "2"], "use --pp 1"),
        (["--recipe", "fp16", "--kv-cache", "int8"], "--kv-cache int8 needs calibrated"),
        (["--recipe", "w8a8-sq-o2"], "has no TensorRT-LLM equivalent"),
        (["--recipe", "w4a16-awq"], "group-wise INT4 linears are padded"),
        (["--recipe", "w8a8-sq", "--int4-zero-point"], "--int4-zero-point applies to group-wise INT4"),
        (["--recipe", "w8a8-sq", "--target", "trtllm-hf"], "PyTorch backend has no W8A8 SmoothQuant"),
    ]
    out = tmp_path / "o"
    for extra, msg in cases:
        target = [] if "--target" in extra else ["--target", "trtllm"]
        with pytest.raises(SqDeployError) as e:
            export_main([m, *target, "--out", str(out), "--quiet", "--calib", str(calib_file), *extra])
        assert msg in str(e.value)
        assert not out.exists() and not list(tmp_path.glob(".o.sqdeploy-*"))
    r = subprocess.run([sys.executable, "-m", "sqdeploy.cli.export", m, "--target", "trtllm", "--tp", "3", "--out", str(out)],
                       capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "--tp 3 is not possible" in lines[0], r.stderr


def test_existing_output_is_kept(tiny_models, tmp_path, calib_file):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SqDeployError, match="already exists"):
        export_main([str(tiny_models["llama"]), "--recipe", "fp16", "--target", "trtllm", "--out", str(out), "--quiet"])
    assert (out / "keep.txt").read_text() == "mine"


def test_shared_model_int4_tp2_is_refused_with_the_remedy(shared_model):
    ck = HFCheckpoint(shared_model)
    awq = QuantSpec("W4A16_AWQ", None, 128, False, True)
    check_split(ck.family, ck.config, awq, 1)
    with pytest.raises(SqDeployError) as e:
        check_split(ck.family, ck.config, awq, 2)
    msg = str(e.value)
    assert "max(64, group 128) * tp = 256" in msg and "use --tp 1" in msg and "group_size 64 (which allows --tp 2)" in msg
    check_split(ck.family, ck.config, QuantSpec("W8A8_SQ_PER_CHANNEL"), 2)
    with pytest.raises(SqDeployError, match="6 attention heads do not split over 4 ranks.*use --tp 1 or 2"):
        check_split(ck.family, ck.config, QuantSpec("W8A8_SQ_PER_CHANNEL"), 4)
