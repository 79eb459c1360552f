"""Writing outputs loses nothing: inputs and foreign trees are never removed, concurrent writers are
refused, signals and crashes leave no temporary copies, modes follow the umask, and readers refuse
a directory whose tokenizer or config changed after the export."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from sqdeploy.cli.common import run_cli
from sqdeploy.cli.export import main as export_main
from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.output import OUTPUT_MARKER, TEMP_MARKER, atomic_output_dir, remove_stale_temps
from sqdeploy.core.report import write_json_atomic
from tests.runtime_support import tiny_onnx

FAST = ["--calib-samples", "4", "--calib-seq-len", "64", "--quiet"]


def _export(model, out, calib, *extra):
    return export_main([str(model), "--recipe", "w8a16-rtn", "--out", str(out), "--calib", str(calib), *FAST, *extra])


def _one_line_error(capsys, main, argv) -> str:
    assert run_cli(main, argv) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("warning: ")]
    assert len(err) == 1 and err[0].startswith("sq: error: "), err
    return err[0]


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".sqdeploy-" in p.name)


@pytest.fixture()
def model_copy(tiny_models, tmp_path) -> Path:
    """A private copy of the tiny model, beside an unrelated file, so a deletion would show."""
    model = shutil.copytree(tiny_models["llama"], tmp_path / "work" / "model")
    (tmp_path / "work" / "notes.txt").write_text("unrelated")
    return Path(model)


# --- 4: --out against the inputs, --force only over previous outputs --------------------------------

def test_out_overlapping_an_input_is_refused(model_copy, calib_file, capsys, monkeypatch):
    calib = model_copy.parent / "calib.jsonl"
    shutil.copy(calib_file, calib)
    before = _tree(model_copy.parent)
    cases = [
        (model_copy, "is the input"),
        (model_copy / "sub", "lies inside the input"),
        (model_copy.parent, "contains the input"),
        (calib, "is the input"),
    ]
    for out, msg in cases:
        for force in ([], ["--force"]):
            argv = [str(model_copy), "--out", str(out), "--calib", str(calib), *FAST, *force]
            assert msg in _one_line_error(capsys, export_main, argv)
    monkeypatch.chdir(model_copy.parent)
    for out in (".", "./", "..", "/", str(Path.home())):
        err = _one_line_error(capsys, export_main, [str(model_copy), "--out", out, "--force", *FAST])
        assert "choose a new directory" in err, err
    assert _tree(model_copy.parent) == before


def test_force_replaces_only_a_previous_output(model_copy, calib_file, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("precious")
    err = _one_line_error(capsys, export_main, [str(model_copy), "--out", str(foreign), "--calib", str(calib_file), *FAST, "--force"])
    assert "--force refused" in err and "not an sq-deploy output" in err
    assert (foreign / "keep.txt").read_text() == "precious"

    out = tmp_path / "q"
    assert _export(model_copy, out, calib_file) == 0
    assert json.loads((out / OUTPUT_MARKER).read_text())["files_sha256"]["config.json"]
    (out / "stale.txt").write_text("from the previous export")
    with pytest.raises(SqDeployError, match="already exists"):
        _export(model_copy, out, calib_file)
    assert _export(model_copy, out, calib_file, "--force") == 0
    assert not (out / "stale.txt").exists() and (out / "sqdeploy.json").exists()
    assert _leftovers(tmp_path) == []


# --- 7: the final rename fails -----------------------------------------------------------------------

def test_failed_swap_keeps_the_previous_output_and_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "o"
    with atomic_output_dir(out) as tmp:
        (tmp / "v").write_text("1")
    original = Path.rename

    def failing(self, target):
        if Path(target) == out and self.name == "out":
            raise PermissionError(13, "Permission denied")
        return original(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(SqDeployError, match="cannot move the output into place.*nothing was changed"):
        with atomic_output_dir(out, force=True) as tmp:
            (tmp / "v").write_text("2")
    assert (out / "v").read_text() == "1" and not (out / TEMP_MARKER).exists()
    assert _leftovers(tmp_path) == []


def test_unwritable_out_is_one_line(model_copy, calib_file, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    err = _one_line_error(capsys, export_main, [str(model_copy), "--out", str(blocker / "q"), "--calib", str(calib_file), *FAST])
    assert "cannot create the parent of --out" in err
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        err = _one_line_error(capsys, export_main, [str(model_copy), "--out", str(ro / "q"), "--calib", str(calib_file), *FAST])
        assert "cannot write beside --out" in err
        assert list(ro.iterdir()) == []


# --- 8: modes follow the umask -----------------------------------------------------------------------

@pytest.mark.parametrize("mask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_output_modes_follow_the_umask(tmp_path, mask, file_mode, dir_mode):
    old = os.umask(mask)
    try:
        with atomic_output_dir(tmp_path / "o") as tmp:
            os.close(os.open(tmp / "private", os.O_CREAT | os.O_WRONLY, 0o600))  # as tempfile writes them
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "sub" / "run.sh").write_text("#!/bin/sh\n")
            os.chmod(tmp / "sub" / "run.sh", 0o700)
        write_json_atomic(tmp_path / "report.json", {"a": 1})  # --json reports
    finally:
        os.umask(old)
    out = tmp_path / "o"
    assert stat.S_IMODE(out.stat().st_mode) == dir_mode
    assert stat.S_IMODE((out / "sub").stat().st_mode) == dir_mode
    assert stat.S_IMODE((out / "private").stat().st_mode) == file_mode
    assert stat.S_IMODE((out / "sub" / "run.sh").stat().st_mode) == dir_mode  # executable stays executable
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == file_mode


def test_exported_files_are_readable_by_others(tiny_models, calib_file, tmp_path):
    old = os.umask(0o022)
    try:
        assert _export(tiny_models["llama"], tmp_path / "q", calib_file) == 0
    finally:
        os.umask(old)
    for p in [tmp_path / "q", *(tmp_path / "q").rglob("*")]:
        assert stat.S_IMODE(p.stat().st_mode) == (0o755 if p.is_dir() else 0o644), p


# --- 5, 6: a real process: lock, SIGTERM, SIGKILL leftovers ------------------------------------------

def _blocked_export(model: Path, out: Path, fifo: Path) -> subprocess.Popen:
    """An export that blocks reading its calibration file (a FIFO nobody writes) once its temporary work exists."""
    if not fifo.exists():
        os.mkfifo(fifo)
    return subprocess.Popen([sys.executable, "-m", "sqdeploy.cli.export", str(model), "--recipe", "w8a16-rtn", "--target", "onnx",
                             "--out", str(out), "--calib", str(fifo), *FAST], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_temps(proc: subprocess.Popen, parent: Path, timeout: float = 180) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        work = list(parent.glob(f".*.sqdeploy-work-{proc.pid}-*"))
        if work and list(work[0].glob(f".quantized.sqdeploy-tmp-{proc.pid}-*")):  # quantizing: reading the calibration
            return work
        time.sleep(0.2)
    proc.kill()
    pytest.fail("the export never started its temporary work")


def test_second_writer_refused_and_sigterm_cleans_up(tiny_models, tmp_path, calib_file):
    out = tmp_path / "q"
    first = _blocked_export(tiny_models["llama"], out, tmp_path / "calib.txt")
    try:
        work = _wait_for_temps(first, tmp_path)
        assert json.loads((work[0] / TEMP_MARKER).read_text())["pid"] == first.pid
        assert (tmp_path / ".q.sqdeploy-lock").read_text().strip() == str(first.pid)
        second = subprocess.run([sys.executable, "-m", "sqdeploy.cli.export", str(tiny_models["llama"]), "--recipe", "w8a16-rtn",
                                 "--out", str(out), "--calib", str(calib_file), *FAST], capture_output=True, text=True)
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        assert f"being written by another process (PID {first.pid})" in lines[0]
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 143, err
    assert err.strip().splitlines()[-1].endswith("terminated (SIGTERM); temporary files removed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt"]  # no output, no temps, no lock file


def test_sigkill_leftovers_are_removed_by_the_next_run(tiny_models, tmp_path, calib_file):
    out = tmp_path / "q"
    proc = _blocked_export(tiny_models["llama"], out, tmp_path / "calib.txt")
    try:
        work = _wait_for_temps(proc, tmp_path)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert all(w.exists() for w in work)  # nothing could clean up: the quantized copy is still there, beside --out
    (tmp_path / ".q.sqdeploy-lock").rename(tmp_path / ".other.sqdeploy-lock")  # a stale lock of another --out
    # not ours, or still running: kept
    alive = tmp_path / f".x.sqdeploy-tmp-{os.getpid()}-0000abcd"
    alive.mkdir()
    (alive / TEMP_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    unmarked = tmp_path / f".y.sqdeploy-tmp-{proc.pid}-0000abcd"
    unmarked.mkdir()
    assert _export(tiny_models["llama"], out, calib_file) == 0  # a lock left by SIGKILL does not block it
    assert (out / "sqdeploy.json").exists()
    assert not any(w.exists() for w in work) and not (tmp_path / ".other.sqdeploy-lock").exists()
    assert alive.exists() and unmarked.exists()


def test_previous_output_moved_aside_by_a_killed_swap_is_restored(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    old = tmp_path / f".q.sqdeploy-old-{pid}-0000abcd"
    old.mkdir()
    (old / "v").write_text("previous")
    (old / TEMP_MARKER).write_text(json.dumps({"pid": pid, "host": os.uname().nodename, "kind": "old", "out": "q"}))
    assert remove_stale_temps(tmp_path) == []
    assert (tmp_path / "q" / "v").read_text() == "previous" and not (tmp_path / "q" / TEMP_MARKER).exists()


# --- 14: the tokenizer and config are checked against the export ------------------------------------

@pytest.fixture(scope="module")
def quantized(tiny_models, calib_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hashes") / "q"
    assert _export(tiny_models["llama"], out, calib_file) == 0
    return out


def _eval(path: Path, calib_file: Path) -> list[str]:
    return [str(path), "--text", str(calib_file), "--windows", "2", "--seq-len", "32", "--quiet"]


def test_swapped_tokenizer_or_edited_config_is_refused(quantized, calib_file, tmp_path, capsys, shared_model):
    from sqdeploy.cli.eval import main as eval_main

    swapped = shutil.copytree(quantized, tmp_path / "swapped")
    other = json.loads((shared_model / "tokenizer.json").read_text())
    other["model"]["vocab"] = dict(reversed(list(other["model"]["vocab"].items())))  # same size, other ids
    (swapped / "tokenizer.json").write_text(json.dumps(other))
    err = _one_line_error(capsys, eval_main, _eval(swapped, calib_file))
    assert "tokenizer.json differs from the file written at export" in err
    from sqdeploy.runtime.backends.torch import TorchBackend

    with pytest.raises(SqDeployError, match="tokenizer.json differs"):  # sq-serve and sq-bench read it the same way
        TorchBackend(swapped)

    edited = shutil.copytree(quantized, tmp_path / "edited")
    cfg = json.loads((edited / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (edited / "config.json").write_text(json.dumps(cfg, indent=2))
    assert "config.json differs" in _one_line_error(capsys, eval_main, _eval(edited, calib_file))

    added = shutil.copytree(quantized, tmp_path / "added")
    (added / "tokenizer.model").write_bytes(b"x")
    assert "was added after the export" in _one_line_error(capsys, eval_main, _eval(added, calib_file))

    older = shutil.copytree(quantized, tmp_path / "older")  # written before hashes were recorded: a warning
    (older / OUTPUT_MARKER).unlink()
    assert run_cli(eval_main, _eval(older, calib_file)) == 0
    assert "has no record of its files' hashes" in capsys.readouterr().err


def test_onnx_export_checks_its_description(tmp_path_factory, tiny_models, tmp_path, capsys):
    from sqdeploy.cli.check import main as check_main

    src = tiny_onnx(tmp_path_factory, tiny_models)
    edited = shutil.copytree(src, tmp_path / "edited")
    meta = json.loads((edited / "sqdeploy-onnx.json").read_text())
    meta["num_layers"] = 1
    (edited / "sqdeploy-onnx.json").write_text(json.dumps(meta))
    assert "sqdeploy-onnx.json differs" in _one_line_error(capsys, check_main, ["onnx", str(edited)])
    (edited / OUTPUT_MARKER).unlink()  # an older export: the description itself is checked
    err = _one_line_error(capsys, check_main, ["onnx", str(edited)])
    assert "'num_layers' (1) does not match" in err
    meta["num_layers"] = 2
    meta["quantization"] = "w8a8"
    (edited / "sqdeploy-onnx.json").write_text(json.dumps(meta))
    assert "field 'quantization'" in _one_line_error(capsys, check_main, ["onnx", str(edited)])

    truncated = shutil.copytree(src, tmp_path / "truncated")
    data = (truncated / "model.onnx").read_bytes()
    (truncated / "model.onnx").write_bytes(data[: len(data) // 3])
    err = _one_line_error(capsys, check_main, ["onnx", str(truncated)])
    assert "is not a readable ONNX model" in err and "truncated" in err


# --- 13: external data stays inside the export -------------------------------------------------------

@pytest.mark.parametrize("location", ["../secret.bin", "../../../victim.txt", "/etc/hostname", "sub/../../secret.bin", "link.data"])
def test_triton_refuses_external_data_outside_the_export(tmp_path, shared_model, location, capsys):
    from sqdeploy.cli.build import main as build_main
    from sqdeploy.testing.tiny_onnx import write_tiny_onnx_dir

    src = write_tiny_onnx_dir(tmp_path / "exp" / "onnx", tokenizer_from=shared_model)
    (tmp_path / "exp" / "secret.bin").write_bytes(b"secret")
    (tmp_path / "victim.txt").write_text("victim")
    (src / "link.data").symlink_to(tmp_path / "exp" / "secret.bin")
    graph = onnx.load(str(src / "model.onnx"), load_external_data=False)
    changed = 0
    for t in graph.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value, changed = location, changed + 1
    assert changed
    onnx.save(graph, str(src / "model.onnx"))
    repo = tmp_path / "repo"
    err = _one_line_error(capsys, build_main, ["--triton", str(src), "--out", str(repo), "--device", "cpu"])
    assert f"location {location!r} " in err and ("leads outside" in err or "not a relative file name" in err), err
    assert not repo.exists() and (tmp_path / "victim.txt").read_text() == "victim"
    assert _leftovers(tmp_path) == []


# --- 15: calibration settings, tokenizer size, --port ------------------------------------------------

def test_calibration_settings_are_checked(tiny_models, calib_file, tmp_path, capsys):
    for bad in ("0", "-3"):
        for opt in ("--calib-samples", "--calib-seq-len"):
            with pytest.raises(SystemExit) as exit_:
                export_main([str(tiny_models["llama"]), "--out", str(tmp_path / "q"), opt, bad])
            err = capsys.readouterr().err
            assert exit_.value.code == 2 and f"argument {opt}: {bad} is not a positive integer" in err, err
    from sqdeploy.model.checkpoint import HFCheckpoint

    positions = HFCheckpoint(tiny_models["llama"]).config.max_positions
    argv = [str(tiny_models["llama"]), "--out", str(tmp_path / "q"), "--calib", str(calib_file), "--calib-samples", "2",
            "--calib-seq-len", str(positions + 1), "--quiet"]
    assert f"--calib-seq-len {positions + 1} is longer than the model's {positions} positions" in _one_line_error(capsys, export_main, argv)
    assert not (tmp_path / "q").exists() and _leftovers(tmp_path) == []


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, calib_file, shared_model, capsys):
    from sqdeploy.cli.eval import main as eval_main
    from sqdeploy.testing.random_model import make_random_model

    small = make_random_model("llama", tmp_path / "small", vocab_size=4096, tokenizer_from=shared_model)
    capsys.readouterr()
    err = _one_line_error(capsys, export_main, [str(small), "--out", str(tmp_path / "q"), "--calib", str(calib_file), *FAST])
    assert "the tokenizer has 8192 tokens but the model's vocabulary is 4096" in err
    err = _one_line_error(capsys, eval_main, _eval(small, calib_file))
    assert "the tokenizer has 8192 tokens but the model's vocabulary is 4096" in err


def test_serve_port_out_of_range_is_an_argument_error(capsys):
    from sqdeploy.cli.serve import build_parser

    assert build_parser().parse_args(["d", "--port", "65535"]).port == 65535
    for port in ("70000", "0", "-1", "http"):
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args(["missing-dir", "--port", port])
        assert exit_.value.code == 2 and "argument --port:" in capsys.readouterr().err
