"""Output directories that lose nothing: checked, locked, written beside ``out`` and swapped in.

Every command that writes a directory (``sq-export``, ``sq-build``, ``sq-bench``) goes
through :func:`atomic_output_dir`:

* ``out`` is checked up front (:func:`check_output_dir`): never ``/``, the home or
  the working directory (or one of its parents), never the same as, inside, or
  around an input (model, quantized directory, calibration file), and an existing
  ``out`` is replaced with ``--force`` only when it is a previous sq-deploy output
  (it holds :data:`OUTPUT_MARKER` or one of the :data:`KNOWN_MANIFESTS`); anything
  else is refused, because a tree sq-deploy did not write is not sq-deploy's to delete.
* an exclusive ``flock`` on ``.<out>.sqdeploy-lock`` beside ``out`` refuses a second
  writer of the same ``out`` (naming the PID that holds it); the kernel releases it
  when its process dies, however it dies.
* the work goes into ``.<out>.sqdeploy-tmp-<pid>-<random>`` beside ``out`` (same
  filesystem, so the final rename is atomic), with a marker file naming the process.
  Interrupted runs (SIGINT, SIGTERM) remove it; a SIGKILLed run's leftovers are
  removed by the next run in that directory once their PID is dead.
* at the end, files get the modes the umask gives (0644/0755 under 022), not
  ``mkdtemp``'s 0700, so a container running as another user can read them; then a
  previous output is moved aside, the new one renamed in and the old one removed.
  If the rename fails the previous output is put back and the new one removed; SIGINT and
  SIGTERM wait for the two renames.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
from pathlib import Path
from typing import Iterable, Iterator

from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.integrity import OUTPUT_MARKER, TEMP_MARKER, record_files

KNOWN_MANIFESTS = ("sqdeploy.json", "sqdeploy-onnx.json", "sqdeploy-build.json")  # outputs older than the marker
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.sqdeploy-(?P<kind>tmp|old|work)-(?P<pid>\d+)-[0-9a-f]+$")
_LOCK_SUFFIX = ".sqdeploy-lock"
_HELD: dict[Path, tuple[int, int]] = {}  # lock path -> (fd, depth): re-entrant within one process


def _abs(path: str | Path) -> Path:
    """Absolute and normalised, symlinks resolved where they exist (``..`` handled like the OS)."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def _within(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def is_previous_output(path: Path) -> bool:
    """Whether ``path`` is a directory sq-deploy wrote (and may therefore replace)."""
    return path.is_dir() and any((path / m).is_file() for m in (OUTPUT_MARKER, *KNOWN_MANIFESTS))


def check_output_dir(out: str | Path, force: bool, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Refuse an ``out`` that would destroy something; returns it as a Path. Cheap: call it first."""
    out = Path(out)
    real = _abs(out)
    cwd = _abs(".")
    if real == Path(real.anchor) or real == _abs(Path.home()):
        raise SqDeployError(f"--out {out} is {real}; choose a new directory for the output")
    if _within(cwd, real):
        raise SqDeployError(f"--out {out} is the working directory or one of its parents; choose a new directory for the output")
    for inp in inputs:
        if inp is None or not str(inp) or not Path(inp).exists():
            continue
        src = _abs(inp)
        if _within(real, src) or _within(src, real):
            where = "is" if real == src else ("lies inside" if _within(real, src) else "contains")
            raise SqDeployError(f"--out {out} {where} the input {inp}; choose an output directory outside the inputs")
    if out.is_symlink():
        raise SqDeployError(f"--out {out} is a symbolic link; pass the directory itself or choose another --out")
    if out.exists():
        if not out.is_dir():
            raise SqDeployError(f"output path {out} exists and is not a directory; choose another --out")
        if not force:
            raise SqDeployError(f"output directory {out} already exists; choose another --out or pass --force to replace it")
        if not is_previous_output(out):
            raise SqDeployError(f"--force refused: {out} is not an sq-deploy output (it has no {OUTPUT_MARKER} or manifest); "
                                "remove it yourself or choose another --out")
    return out


def write_output_record(path: Path) -> None:
    """Mark ``path`` as an sq-deploy output, with the hashes readers check (:mod:`sqdeploy.core.integrity`)."""
    from sqdeploy import __version__

    record = {"written_by": "sq-deploy", "version": __version__, "files_sha256": record_files(path)}
    (path / OUTPUT_MARKER).write_text(json.dumps(record, indent=2) + "\n")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def umask() -> int:
    """The process's umask, read without changing it where /proc allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Give every file and directory under ``root`` the mode a plain write would (umask applied)."""
    mask = umask()
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for f in filenames:
            p = os.path.join(dirpath, f)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:  # a hard link shares its source's mode: leave it
                os.chmod(p, (0o777 if st.st_mode & 0o111 else 0o666) & ~mask)


def _marker(kind: str, out: Path) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "kind": kind, "out": out.name}


def _new_temp(out: Path, kind: str) -> Path:
    """``.<name>.sqdeploy-<kind>-<pid>-<hex>`` beside ``out``, with its marker file."""
    path = out.parent / f".{out.name}.sqdeploy-{kind}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        path.mkdir()
    except OSError as exc:
        raise SqDeployError(f"cannot write beside --out {out}: {exc.strerror or exc} ({out.parent})") from None
    (path / TEMP_MARKER).write_text(json.dumps(_marker(kind, out)) + "\n")
    return path


def remove_stale_temps(parent: Path) -> list[Path]:
    """Remove the temporary directories of dead sq-deploy processes in ``parent``; returns them.

    Only directories whose name matches the pattern *and* which hold a marker naming
    a process of this host that no longer runs are touched. A previous output moved
    aside for a swap (``old``) is put back if its name is free again, else removed.
    """
    removed: list[Path] = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    host = socket.gethostname()
    for p in entries:
        if p.name.startswith(".") and p.name.endswith(_LOCK_SUFFIX) and p.is_file() and not p.is_symlink():
            _remove_unheld_lock(p)
            continue
        m = _TEMP_RE.match(p.name)
        if m is None or p.is_symlink() or not p.is_dir():
            continue
        try:
            marker = json.loads((p / TEMP_MARKER).read_text())
        except (OSError, ValueError):
            continue
        pid = int(m["pid"])
        if not isinstance(marker, dict) or marker.get("pid") != pid or marker.get("host") != host or _pid_alive(pid):
            continue
        target = parent / m["name"]
        if m["kind"] == "old" and not target.exists() and not target.is_symlink():
            try:
                p.rename(target)
            except OSError:
                continue  # cannot put it back now: keep it for a later run, never delete it
            (target / TEMP_MARKER).unlink(missing_ok=True)
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _remove_unheld_lock(path: Path) -> None:
    """A lock file left by a killed writer: removed while holding it (a waiting writer then retries)."""
    if _abs(path) in _HELD:
        return
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino == os.stat(path).st_ino:
            path.unlink()
    except OSError:
        pass  # held by a live writer, or already gone
    finally:
        os.close(fd)


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}{_LOCK_SUFFIX}"


@contextlib.contextmanager
def output_lock(out: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` (re-entrant in this process); a second process is refused."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SqDeployError(f"cannot create the parent of --out {out}: {exc.strerror or exc}") from None
    path = _lock_path(_abs(out))
    if path in _HELD:
        fd, depth = _HELD[path]
        _HELD[path] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _HELD[path]
            _HELD[path] = (fd, depth - 1)
        return
    fd = _acquire(path, out)
    _HELD[path] = (fd, 1)
    try:
        yield
    finally:
        del _HELD[path]
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def _acquire(path: Path, out: Path) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise SqDeployError(f"cannot write beside --out {out}: {exc.strerror or exc} ({out.parent})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise SqDeployError(f"--out {out} is being written by another process (PID {holder}); "
                                    "wait for it to finish or choose another --out") from None
            raise
        try:  # the holder we waited on may have removed the file: lock the one that is there now
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


@contextlib.contextmanager
def scratch_dir(out: str | Path, label: str = "work") -> Iterator[Path]:
    """A temporary working directory beside ``out`` (not in /tmp), removed on exit however it exits."""
    out = Path(out)
    with output_lock(out):
        remove_stale_temps(out.parent)
        tmp = _new_temp(out, "work")
        try:
            yield tmp / label
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT/SIGTERM wait until the block is done: the two renames of a swap are not separated."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _swap(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; a previous ``out`` is moved aside first and removed after."""
    with _signals_deferred():
        old = _swap_renames(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _swap_renames(tmp: Path, out: Path) -> Path | None:
    old = None
    try:
        if out.exists():
            old = out.parent / f".{out.name}.sqdeploy-old-{os.getpid()}-{secrets.token_hex(4)}"
            out.rename(old)
            (old / TEMP_MARKER).write_text(json.dumps(_marker("old", out)) + "\n")
        tmp.rename(out)
    except OSError as exc:
        if old is not None and old.exists() and not out.exists():
            old.rename(out)
            (out / TEMP_MARKER).unlink(missing_ok=True)
        raise SqDeployError(f"cannot move the output into place at {out}: {exc.strerror or exc}; "
                            "nothing was changed there") from None
    return old


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, force: bool = False, inputs: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """Yield an empty directory beside ``out`` that becomes ``out`` when the block succeeds."""
    inputs = list(inputs)
    out = check_output_dir(out, force, inputs)
    with output_lock(out):
        remove_stale_temps(out.parent)
        check_output_dir(out, force, inputs)  # again under the lock: another writer may have finished meanwhile
        tmp = _new_temp(out, "tmp")
        try:
            work = tmp / "out"
            work.mkdir()
            yield work
            write_output_record(work)
            apply_umask(work)
            _swap(work, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
