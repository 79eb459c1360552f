"""Exports shared by the runtime, serving and benchmark tests, built once per test session."""

from __future__ import annotations

from pathlib import Path

_CACHE: dict[str, Path] = {}


def _once(key: str, make) -> Path:
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def export_onnx(src: Path, out: Path, recipe: str | None = None, dtype: str = "float32") -> Path:
    from sqdeploy.cli.export import main as export_main

    args = [str(src), "--target", "onnx", "--dtype", dtype, "--out", str(out), "--quiet"]
    if recipe:
        args += ["--recipe", recipe]
    assert export_main(args) in (0, None)
    return out


def tiny_onnx(tmp_path_factory, tiny_models) -> Path:
    """The tiny random Llama, unquantized, as a float32 ONNX export (fast to build and to run)."""
    return _once("tiny", lambda: export_onnx(tiny_models["llama"], tmp_path_factory.mktemp("rt") / "tiny-llama", "fp16"))


def shared_onnx(tmp_path_factory, shared_model) -> Path:
    """The shared trained model as a float32 ONNX export: clear argmax margins, so greedy text is stable."""
    return _once("shared", lambda: export_onnx(shared_model, tmp_path_factory.mktemp("rt") / "code-llama", "fp16"))


def tiny_w8a8(tmp_path_factory, tiny_models, calib_file) -> tuple[Path, Path]:
    """(quantized dir, its float32 ONNX export): SmoothQuant W8A8 with a fixed alpha (no search, seconds)."""

    def make():
        from sqdeploy.quantize.pipeline import Calibration, Runtime, quantize_to_dir

        root = tmp_path_factory.mktemp("rt-w8a8")
        recipe = root / "w8a8-sq-fixed.yaml"
        recipe.write_text(
            "name: w8a8-sq-fixed\ndescription: SmoothQuant W8A8 with alpha 0.5\n"
            "scheme:\n  weight: {bits: 8, granularity: channel, symmetric: true}\n  act: {kind: static_tensor}\n"
            "algorithm:\n  name: smoothquant\n  alpha: 0.5\n"
        )
        qdir, _ = quantize_to_dir(
            tiny_models["llama"], str(recipe), root / "q", Calibration(str(calib_file), 4, 64), Runtime(progress=False)
        )
        export_onnx(Path(qdir), root / "onnx")
        return root

    root = _once("w8a8", make)
    return root / "q", root / "onnx"
