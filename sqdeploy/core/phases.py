"""Where an export's time goes: seconds per phase, as a machine-readable record.

The driver and the writers mark the end of each step with :func:`lap` (the time since
the previous mark is added to that phase's total), so timing needs no re-indented
blocks in the code it measures. With ``SQDEPLOY_PHASES_JSON=PATH`` in the environment
the process writes, when it exits (also after an error), a JSON record with the totals,
the count of each phase, the peak resident memory of the process (``VmHWM``) and, when
CUDA was used, ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``. Benchmarks
(``tools/bench_export_gpu.py``) read it; without the variable nothing is recorded and
:func:`lap` costs one clock read.

On a GPU the time of queued kernels would land in whichever phase next waits for them,
so while recording, :func:`lap` synchronizes the device first.
"""

from __future__ import annotations

import atexit
import json
import os
import time
from pathlib import Path

ENV = "SQDEPLOY_PHASES_JSON"

_totals: dict[str, float] = {}
_counts: dict[str, int] = {}
_last = time.perf_counter()
_start = _last
_recording = bool(os.environ.get(ENV))
_section = "other"


def _sync() -> None:
    try:
        import torch

        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 - timing must never break an export
        pass


def restart() -> None:
    """Start the next phase's clock now (time since the last mark belongs to no phase)."""
    global _last
    if _recording:
        _sync()
    _last = time.perf_counter()


def section(name: str) -> None:
    """Name the phase that a bare :func:`lap` closes (set by the caller of shared code such as
    GPTQ, which marks its own time as ``GPTQ`` and the time before it as the caller's section)."""
    global _section
    _section = name


def lap(name: str | None = None) -> None:
    """The time since the previous mark was spent in phase ``name`` (default: the current section)."""
    global _last
    name = name or _section
    if _recording:
        _sync()
    now = time.perf_counter()
    _totals[name] = _totals.get(name, 0.0) + (now - _last)
    _counts[name] = _counts.get(name, 0) + 1
    _last = now


def totals() -> dict[str, float]:
    return {k: round(v, 3) for k, v in _totals.items()}


def peak_rss_bytes() -> int | None:
    """The process's peak resident set (``VmHWM``), or None where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def record() -> dict:
    out: dict = {"phases": totals(), "counts": dict(_counts), "wall_s": round(time.perf_counter() - _start, 3),
                 "peak_rss_bytes": peak_rss_bytes()}
    try:
        import torch

        if torch.cuda.is_initialized():
            out["cuda_max_memory_allocated"] = int(torch.cuda.max_memory_allocated())
            out["cuda_max_memory_reserved"] = int(torch.cuda.max_memory_reserved())
            out["cuda_device"] = torch.cuda.get_device_name()
    except Exception:  # noqa: BLE001
        pass
    return out


def _dump() -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    try:
        Path(path).write_text(json.dumps(record(), indent=1) + "\n")
    except OSError:
        pass


if _recording:
    atexit.register(_dump)
