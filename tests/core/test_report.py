"""Reports name the code they ran from, also where a copy's git metadata lags its files."""

import shutil
import subprocess

import pytest

from sqdeploy.core.report import source_revision

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def test_source_revision_marks_changed_files_and_yields_to_the_override(tmp_path, monkeypatch):
    monkeypatch.delenv("SQDEPLOY_COMMIT", raising=False)
    assert source_revision(tmp_path) is None  # not a checkout
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    sha = _git(tmp_path, "rev-parse", "--short", "HEAD")
    assert source_revision(tmp_path) == sha
    (tmp_path / "b.py").write_text("untracked files do not count\n")
    assert source_revision(tmp_path) == sha
    (tmp_path / "a.py").write_text("x = 2\n")  # files newer than the metadata: a lagging copy
    assert source_revision(tmp_path) == sha + "+changes"
    monkeypatch.setenv("SQDEPLOY_COMMIT", "abc1234")
    assert source_revision(tmp_path) == "abc1234"
