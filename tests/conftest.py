"""Shared fixtures: tiny random models of every family and the shared real model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sqdeploy.testing.random_model import TINY_CONFIGS, make_random_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SQDEPLOY_SHARED", ROOT.parent / "shared"))
SHARED_MODEL = SHARED / "models" / "tiny-code-llama"
HELDOUT = SHARED / "data" / "heldout-code-llama.txt.gz"
HUMANEVAL = SHARED / "data" / "humaneval.jsonl.gz"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared_model() -> Path:
    if not (SHARED_MODEL / "config.json").exists():
        pytest.skip(f"shared model not found at {SHARED_MODEL}")
    return SHARED_MODEL


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One random-initialised checkpoint per supported family (float32, with the shared tokenizer)."""
    root = tmp_path_factory.mktemp("tiny")
    tok = SHARED_MODEL if SHARED_MODEL.exists() else None
    return {fam: make_random_model(fam, root / fam, tokenizer_from=tok) for fam in TINY_CONFIGS}


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_model(request, tiny_models) -> Path:
    return tiny_models[request.param]


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    """A small calibration text (Python code in tests/data, fixed so results do not move with the sources)."""
    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    import json

    src = (ROOT / "tests" / "data" / "calib-code.txt").read_text()
    path.write_text("\n".join(json.dumps({"text": src[i : i + 2000]}) for i in range(0, len(src), 2000)) + "\n")
    return path
