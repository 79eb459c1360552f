"""Small helpers for the tables and reports every command prints and writes."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Sequence


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e-3 or abs(v) >= 1e5 else f"{v:.4f}".rstrip("0").rstrip(".")
        return str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from sqdeploy.core.output import umask

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=_jsonable)
            f.write("\n")
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp's 0600 would hide the report from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), for reports: timings on this project's machines depend on
    the CPU generation, and ``platform.processor()`` says only ``x86_64`` on Linux."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def source_revision(root: str | Path | None = None) -> str | None:
    """The short commit a report's code ran from, with ``+changes`` when tracked files differ from it, or
    None outside a git checkout. ``SQDEPLOY_COMMIT`` overrides it: a copy of the checkout whose git
    metadata lags its files (as on a lent GPU machine) would otherwise label its report with an older
    commit; the ``+changes`` mark shows such a copy even without the override."""
    import subprocess

    if os.environ.get("SQDEPLOY_COMMIT"):
        return os.environ["SQDEPLOY_COMMIT"]
    cwd = str(root or Path(__file__).resolve().parents[2])

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", cwd, *args], capture_output=True, text=True, timeout=20).stdout.strip()

    try:
        sha = git("rev-parse", "--short", "HEAD")
        changed = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+changes" if changed else "")) if sha else None
