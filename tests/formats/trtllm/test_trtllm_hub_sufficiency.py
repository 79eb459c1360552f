"""The quantized directory is sufficient for --target trtllm: with the source model and the
calibration data deleted, schemes that TensorRT-LLM re-quantizes (asymmetric INT4 with GPTQ
rounding, weight-only INT8) export byte for byte as they did with both present; a directory
that does not keep what re-quantization needs is refused in one line that names the remedy."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from sqdeploy.core.errors import SqDeployError
from sqdeploy.quantize.pipeline import Calibration, Runtime, quantize_to_dir
from sqdeploy.quantize.qmodel import KEPT_CALIBRATION, KEPT_SOURCE
from sqdeploy.testing.random_model import make_random_model
from tests.conftest import SHARED_MODEL
from tests.formats.trtllm.test_trtllm_support import SQ_TOKEN, export, int4_recipe, recipe

OUTPUT_FILES = ("config.json", "rank0.safetensors", "rank1.safetensors")


def _model(tmp_path):
    if not SHARED_MODEL.exists():
        pytest.skip(f"calibration needs the shared model's tokenizer ({SHARED_MODEL})")
    return make_random_model("llama", tmp_path / "src", tokenizer_from=SHARED_MODEL)


def _files(d) -> dict[str, object]:
    """config.json's bytes; each rank file as (header, tensor bytes): the header parsed, because
    safetensors writes the ``__metadata__`` keys in an order that varies from run to run."""
    out: dict[str, object] = {}
    for n in OUTPUT_FILES:
        if (d / n).exists():
            raw = (d / n).read_bytes()
            if n.endswith(".safetensors"):
                size = struct.unpack("<Q", raw[:8])[0]
                out[n] = (json.loads(raw[8 : 8 + size]), raw[8 + size :])
            else:
                out[n] = raw
    return out


@pytest.mark.parametrize("spec,tp", [(int4_recipe(64, rounding="gptq", act_order=True), 1), ("w8a16-rtn", 1)],
                         ids=["int4-asymmetric-gptq", "w8a16"])
def test_export_without_the_source_model_matches(spec, tp, calib_file, tmp_path):
    src = _model(tmp_path)
    calib = tmp_path / "calib.jsonl"
    shutil.copy(calib_file, calib)
    qdir = tmp_path / "q"
    quantize_to_dir(src, recipe(spec), qdir, Calibration(str(calib), 4, 64), Runtime(progress=False), keep_source=True)
    assert (qdir / KEPT_SOURCE / "config.json").exists()
    with_source = export(qdir, tmp_path / "with", tp, int4_requant_clip="none")
    shutil.rmtree(src)
    calib.unlink()
    without = export(qdir, tmp_path / "without", tp, int4_requant_clip="none")
    assert without["requantized_from"] == with_source["requantized_from"] == "smoothed float weights"
    assert without["requant_rounding"] == with_source["requant_rounding"]
    assert _files(tmp_path / "without") == _files(tmp_path / "with") and len(_files(tmp_path / "with")) == 1 + tp


def test_a_directory_without_the_kept_source_names_the_remedy(calib_file, tmp_path):
    src = _model(tmp_path)
    qdir = tmp_path / "q"
    quantize_to_dir(src, recipe(int4_recipe(64, rounding="gptq")), qdir, Calibration(str(calib_file), 2, 32), Runtime(progress=False),
                    keep_source=True)
    (qdir / KEPT_CALIBRATION).unlink()
    with pytest.raises(SqDeployError, match="does not keep the calibration set.*re-export from the Hugging Face model"):
        export(qdir, tmp_path / "no_calibration", 1)
    shutil.rmtree(qdir / KEPT_SOURCE)  # as directories written by older versions
    with pytest.raises(SqDeployError, match="does not keep the source weights.*re-export from the Hugging Face model") as err:
        export(qdir, tmp_path / "no_source", 1)
    assert "\n" not in str(err.value)


def test_schemes_with_stored_integers_keep_nothing(calib_file, tmp_path):
    """Symmetric INT4 and W8A8 are written as stored: their directories do not grow."""
    src = _model(tmp_path)
    for i, spec in enumerate((int4_recipe(64, symmetric=True), SQ_TOKEN)):
        qdir = tmp_path / f"q{i}"
        quantize_to_dir(src, recipe(spec), qdir, Calibration(str(calib_file), 2, 32), Runtime(progress=False), keep_source=True)
        assert not (qdir / KEPT_SOURCE).exists() and not (qdir / KEPT_CALIBRATION).exists()


def test_the_copy_is_kept_only_when_asked(calib_file, tmp_path):
    """A plain quantized directory stays the size of the quantized model: the copy is opt-in."""
    src = _model(tmp_path)
    qdir = tmp_path / "q"
    quantize_to_dir(src, recipe(int4_recipe(64, rounding="gptq")), qdir, Calibration(str(calib_file), 2, 32), Runtime(progress=False))
    assert not (qdir / KEPT_SOURCE).exists() and not (qdir / KEPT_CALIBRATION).exists()
    with pytest.raises(SqDeployError, match="--keep-source"):
        export(qdir, tmp_path / "t", 1)
