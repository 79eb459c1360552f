"""The GPU self-check's verdicts, on the CPU: which failure switches a whole mechanism off."""

import pytest
import torch

pytest.importorskip("triton")

from sqdeploy.kernels.tuning import Tuner  # noqa: E402
from sqdeploy.testing import kernel_selftest as ks  # noqa: E402


def _cases(outcomes: dict):
    """One tuner whose forced configuration decides the outcome: 'ok', 'wrong' or 'raise'."""
    tuner = Tuner("selftest_probe")
    cands = [dict(TILE=name, SPLIT_K=4) for name in outcomes]
    expect = torch.ones(4)

    def run():
        what = outcomes[tuner.forced["TILE"]]
        if what == "raise":
            raise RuntimeError("does not compile for this GPU")
        out = expect if what == "ok" else expect * 2
        return [out.clone() for _ in range(3)], expect

    return tuner, [(tuner, cands, run)]


@pytest.fixture(autouse=True)
def _clean_disabled():
    yield
    Tuner.disabled.pop("selftest_probe", None)
    Tuner.registry.pop("selftest_probe", None)


def test_a_tile_that_does_not_compile_leaves_split_k_on(monkeypatch):
    tuner, cases = _cases({"a": "ok", "b": "raise"})
    monkeypatch.setattr(ks, "_splitk_cases", lambda: cases)
    rows = []
    assert ks.check_splitk(rows) is True
    assert [r["ok"] for r in rows] == [True, False]
    assert Tuner.usable(tuner.name, dict(TILE="a", SPLIT_K=4))
    assert not Tuner.usable(tuner.name, dict(TILE="b", SPLIT_K=2))


def test_a_wrong_split_result_distrusts_the_reduction(monkeypatch):
    _, cases = _cases({"a": "ok", "b": "wrong"})
    monkeypatch.setattr(ks, "_splitk_cases", lambda: cases)
    assert ks.check_splitk([]) is False
