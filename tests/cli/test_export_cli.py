"""sq-export / sq-eval end to end on tiny models, and every bad input the issue lists."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from sqdeploy.cli.eval import main as eval_main
from sqdeploy.cli.export import main as export_main
from sqdeploy.core.errors import SqDeployError
from sqdeploy.model import load_model
from sqdeploy.quantize.qmodel import QuantizedModel


def _export(model, out, recipe, calib, *extra):
    return export_main([str(model), "--recipe", recipe, "--out", str(out), "--calib", str(calib),
                        "--calib-samples", "4", "--calib-seq-len", "64", "--quiet", *extra])


@pytest.mark.parametrize("recipe", ["w8a8-sq", "w4a16-rtn", "fp16"])
def test_export_writes_compressed_tensors_dir(tiny_models, tmp_path, calib_file, recipe):
    out = tmp_path / "q"
    assert _export(tiny_models["llama"], out, recipe, calib_file) == 0
    cfg = json.loads((out / "config.json").read_text())
    manifest = json.loads((out / "sqdeploy.json").read_text())
    assert manifest["recipe"]["name"] == recipe
    assert (out / "tokenizer.json").exists()
    if recipe != "fp16":
        assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
        assert manifest["calibration"]["samples"] == 4
    q = QuantizedModel(out)
    model = load_model(q)
    assert torch.isfinite(model(torch.randint(0, 100, (1, 16)))).all()
    assert not list(tmp_path.glob(".q.sqdeploy-*"))  # nothing left behind


def test_in_memory_model_equals_saved_model(tiny_models, tmp_path, calib_file):
    """The model sq-eval scores is bit-for-bit the model sq-export writes."""
    from sqdeploy.quantize.pipeline import Calibration, Runtime, quantize_in_memory, quantize_to_dir

    cal = Calibration(str(calib_file), 4, 64)
    for fam in ("llama", "opt"):
        for recipe in ("w8a8-sq", "w4a16-awq"):
            mem, _ = quantize_in_memory(tiny_models[fam], recipe, cal, Runtime(progress=False))
            out, _ = quantize_to_dir(tiny_models[fam], recipe, tmp_path / f"{fam}-{recipe}", cal, Runtime(progress=False))
            disk = load_model(QuantizedModel(out))
            ids = torch.randint(0, 1000, (2, 24))
            with torch.no_grad():
                assert torch.equal(mem(ids), disk(ids)), (fam, recipe)


def test_existing_out_refused_then_forced(tiny_models, tmp_path, calib_file):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(SqDeployError, match="already exists.*--force"):
        _export(tiny_models["llama"], out, "w4a16-rtn", calib_file)
    assert (out / "keep.txt").read_text() == "precious"
    with pytest.raises(SqDeployError, match="--force refused.*not an sq-deploy output"):
        _export(tiny_models["llama"], out, "w4a16-rtn", calib_file, "--force")
    assert (out / "keep.txt").read_text() == "precious"
    shutil.rmtree(out)
    assert _export(tiny_models["llama"], out, "w4a16-rtn", calib_file) == 0
    assert _export(tiny_models["llama"], out, "w4a16-rtn", calib_file, "--force") == 0  # a previous export: replaced
    assert (out / "sqdeploy.json").exists()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "sqdeploy.cli.export", *map(str, args)], capture_output=True, text=True)


def test_cli_errors_are_one_line_and_nonzero(tmp_path, tiny_models, calib_file):
    cases = [
        ([tmp_path / "missing", "--recipe", "w8a8-sq"], "does not exist"),
        ([tiny_models["llama"], "--recipe", "nope"], "unknown recipe 'nope'; built-in recipes:"),
    ]
    for args, msg in cases:
        r = _cli(*args, "--out", tmp_path / "o", "--quiet")
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and msg in lines[0], r.stderr
        assert not (tmp_path / "o").exists()


def test_unknown_architecture(tmp_path, tiny_models, calib_file):
    bad = tmp_path / "gpt2"
    shutil.copytree(tiny_models["llama"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SqDeployError, match="unsupported architecture GPT2LMHeadModel; supported: .*LlamaForCausalLM"):
        _export(bad, tmp_path / "o", "w8a8-sq", calib_file)


def test_group_size_not_dividing(tmp_path, tiny_models, calib_file):
    recipe = tmp_path / "g256.yaml"
    recipe.write_text("scheme: {weight: {bits: 4, granularity: group, group_size: 256, symmetric: false}}\nalgorithm: rtn\n")
    with pytest.raises(SqDeployError, match="in_features 128 is not a multiple of group_size 256"):
        _export(tiny_models["llama"], tmp_path / "o", str(recipe), calib_file)
    assert not (tmp_path / "o").exists()


def test_nan_weights_and_truncated_shard(tmp_path, tiny_models, calib_file):
    bad = tmp_path / "nan"
    shutil.copytree(tiny_models["llama"], bad)
    weights = load_file(str(bad / "model.safetensors"))
    weights["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(weights, str(bad / "model.safetensors"))
    with pytest.raises(SqDeployError, match="contains NaN or Inf"):
        _export(bad, tmp_path / "o", "w4a16-rtn", calib_file)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SqDeployError, match="truncated or corrupt"):
        _export(bad, tmp_path / "o", "w4a16-rtn", calib_file)
    assert not (tmp_path / "o").exists()


def test_nan_in_calibration_activations(tmp_path, tiny_models, calib_file):
    bad = tmp_path / "overflow"
    shutil.copytree(tiny_models["llama"], bad)
    weights = load_file(str(bad / "model.safetensors"))
    weights["model.layers.0.mlp.up_proj.weight"] *= 1e30  # finite weights, infinite activations
    weights["model.layers.0.mlp.down_proj.weight"] *= 1e30
    save_file(weights, str(bad / "model.safetensors"))
    with pytest.raises(SqDeployError, match="calibration activations after layer 0 contain NaN or Inf"):
        _export(bad, tmp_path / "o", "w8a8-sq", calib_file)


def test_empty_calibration_set(tmp_path, tiny_models):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SqDeployError, match="calibration set .* is empty"):
        _export(tiny_models["llama"], tmp_path / "o", "w8a8-sq", empty)


def test_sq_eval_table_and_json(tmp_path, tiny_models, calib_file, capsys):
    text = tmp_path / "t.txt"
    text.write_text((calib_file.read_text() * 4))
    js = tmp_path / "r.json"
    assert eval_main([str(tiny_models["qwen2"]), "--recipe", "w8a8-sq", "--recipe", "w4a16-rtn", "--text", str(text),
                      "--windows", "2", "--seq-len", "64", "--json", str(js), "--calib", str(calib_file),
                      "--calib-samples", "4", "--calib-seq-len", "64", "--quiet"]) == 0
    res = json.loads(js.read_text())["results"]
    assert [r["name"] for r in res] == ["float32 (unquantized)", "w8a8-sq", "w4a16-rtn"]
    assert all(r["perplexity"] > 1 for r in res)
    assert "perplexity" in capsys.readouterr().out


def test_paired_change_is_the_mean_log_ratio_and_its_standard_error():
    import math

    from sqdeploy.evaluate.perplexity import Perplexity, paired_change

    def ppl(nlls):
        return Perplexity(math.exp(sum(nlls) / len(nlls)), sum(nlls) / len(nlls), 100 * len(nlls), [math.exp(x) for x in nlls])

    base = ppl([2.0, 1.0, 3.0, 2.5])
    other = ppl([2.1, 1.0, 3.3, 2.5])  # differences 0.1, 0, 0.3, 0: mean 0.1, squared deviations 0.06
    c = paired_change(base.per_window_nll, other.per_window_nll)
    assert c.relative == pytest.approx(math.exp(0.1) - 1) == pytest.approx(other.ppl / base.ppl - 1)
    assert c.stderr == pytest.approx(math.exp(0.1) * math.sqrt(0.06 / 3) / 2)  # s.e. = sd / sqrt(4)
    assert str(c) == f"+{100 * (math.exp(0.1) - 1):.2f}% ± {100 * c.stderr:.2f}%"
    # a constant shift on every window is a certain difference, however hard each window is
    assert paired_change(base.per_window_nll, ppl([2.05, 1.05, 3.05, 2.55]).per_window_nll).stderr == pytest.approx(0, abs=1e-12)
    assert paired_change(base.per_window_nll, base.per_window_nll).relative == 0
    with pytest.raises(SqDeployError, match="same windows"):
        paired_change(base.per_window_nll, [2.0])


def test_list_recipes_needs_no_model(capsys):
    assert export_main(["--list-recipes"]) == 0
    out = capsys.readouterr().out
    assert "w8a8-sq" in out and "w4a16-sqplus" in out
    with pytest.raises(SystemExit) as e:
        export_main([])
    assert e.value.code != 0
    assert "model directory is required" in capsys.readouterr().err


class _CharTokenizer:
    def __call__(self, text, add_special_tokens=False, verbose=True):  # the keywords eval_windows passes
        return type("Enc", (), {"input_ids": [ord(c) % 251 for c in text]})()


def test_validation_windows_share_no_token_with_the_standard_ones():
    from sqdeploy.evaluate.perplexity import eval_windows

    text = "".join(chr(32 + (i * 7919) % 90) for i in range(60_000))  # a step of 24 windows >= 4 x 512
    ids = torch.tensor(_CharTokenizer()(text).input_ids)
    std = eval_windows(_CharTokenizer(), text, 24, 512)
    val = eval_windows(_CharTokenizer(), text, 48, 512, offset=0.5)
    step24, step48 = (ids.numel() - 512) // 24, (ids.numel() - 512) // 48
    std_starts = [i * step24 for i in range(24)]
    val_starts = [int((i + 0.5) * step48) for i in range(48)]
    assert torch.equal(val[5], ids[val_starts[5] : val_starts[5] + 512]) and torch.equal(std[3], ids[3 * step24 : 3 * step24 + 512])
    assert all(abs(a - b) >= 512 for a in std_starts for b in val_starts)  # disjoint spans
    with pytest.raises(SqDeployError, match="window-offset"):
        eval_windows(_CharTokenizer(), text, 24, 512, offset=1.0)
