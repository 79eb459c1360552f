"""Atomic output directories: write into a temporary sibling, rename at the end.

A failed or interrupted export leaves nothing half-written at ``out``, and an existing
``out`` is only replaced (never merged into) with ``force``.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import SqDeployError


def check_output_dir(out: str | Path, force: bool) -> Path:
    out = Path(out)
    if out.exists() and not force:
        raise SqDeployError(f"output directory {out} already exists; choose another --out or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise SqDeployError(f"output path {out} exists and is not a directory")
    return out


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` when the block succeeds."""
    out = check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(old / out.name)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
