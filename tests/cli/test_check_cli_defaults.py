"""sq-check's defaults and help: perplexities comparable with the README's tables, every option
discoverable from ``sq-check --help``, and no tokenizer length warning for text that is windowed
after tokenization."""

from __future__ import annotations

import argparse
import json

import pytest

from sqdeploy.cli.check import main as check_main
from sqdeploy.formats.onnx.check import STANDARD, window_setting


def test_help_lists_every_subcommands_options(capsys):
    with pytest.raises(SystemExit) as exc:
        check_main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--windows", "--seq-len", "--text", "--exact", "--no-values"):
        assert option in out


def test_text_windows_default_to_sq_evals_standard():
    ns = lambda **kw: argparse.Namespace(**{"text": None, "windows": None, "seq_len": None, **kw})  # noqa: E731
    assert window_setting(ns(text="held-out.txt.gz")) == STANDARD == (24, 512)
    assert window_setting(ns()) == (4, 256)  # random ids: the arithmetic only
    assert window_setting(ns(text="t", windows=2, seq_len=64)) == (2, 64)


def test_perplexity_row_names_its_windows(tiny_models, tmp_path):
    from sqdeploy.cli.export import main as export_main

    out = tmp_path / "onnx"
    assert export_main([str(tiny_models["llama"]), "--recipe", "fp16", "--target", "onnx", "--dtype", "float32",
                        "--out", str(out), "--quiet"]) == 0
    js = tmp_path / "r.json"
    assert check_main(["onnx", str(out), "--windows", "1", "--seq-len", "32", "--json", str(js)]) == 0
    names = [r["check"] for r in json.loads(js.read_text())["rows"]]
    assert any(n.endswith("perplexity (1 x 32 random ids)") for n in names), names


def test_windowing_long_text_prints_no_length_warning(shared_model, capfd):
    from transformers import AutoTokenizer

    from sqdeploy.evaluate.perplexity import eval_windows

    tok = AutoTokenizer.from_pretrained(shared_model)
    text = "def f(x):\n    return x + 1\n\n" * 400  # several times the model's 1024 positions
    windows = eval_windows(tok, text, windows=2, seq_len=64)
    assert windows.shape == (2, 64)
    assert "longer than the specified maximum" not in capfd.readouterr().err
