"""Tensor parallelism on the CPU: TensorRT-LLM checkpoints exported at tp 1 and tp 2, run by rank.

tp 1 must equal the checkpoint reader's (merged) PyTorch reference; tp 2 must equal tp 1
(same greedy tokens, logits to float32 rounding: column-parallel slices and static
per-tensor activation scales make the sharded arithmetic the same numbers). The sharding
is checked with the ranks as threads (fast, several recipes) and once end to end with the
real engine: two processes over gloo.
"""

from __future__ import annotations

import threading

import pytest
import torch

from sqdeploy.core.errors import SqDeployError
from sqdeploy.formats.trtllm.options import TrtllmOptions
from sqdeploy.formats.trtllm.reader import TrtllmCheckpoint
from sqdeploy.formats.trtllm.writer import write
from sqdeploy.kernels import greedy_generate
from sqdeploy.model.loading import load_model
from sqdeploy.quantize.pipeline import Calibration, Runtime, quantize_to_dir
from sqdeploy.quantize.recipes import parse_recipe
from sqdeploy.runtime.tp import TPEngine, build_rank_model
from tests.runtime.tp_model import tp_llama

IDS = torch.randint(0, 8000, (2, 16), generator=torch.Generator().manual_seed(0))
RECIPES = {
    "fp16": "fp16",
    "w8a8-static": {"weight": {"bits": 8, "granularity": "channel"}, "act": {"kind": "static_tensor"}},
    "w4a16-g64": {"weight": {"bits": 4, "granularity": "group", "group_size": 64, "symmetric": True}},
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, calib_file):
    """recipe -> {tp: TensorRT-LLM checkpoint dir} of a Llama whose shapes split over 2 ranks even at INT4."""
    root = tmp_path_factory.mktemp("tp")
    model = tp_llama(root)
    out = {}
    for name, scheme in RECIPES.items():
        recipe = scheme if isinstance(scheme, str) else parse_recipe({"name": name, "scheme": scheme, "algorithm": "rtn"})
        q = root / f"q-{name}"
        quantize_to_dir(model, recipe, q, Calibration(str(calib_file), 2, 32), Runtime(progress=False))
        out[name] = {}
        for tp in (1, 2):
            ck = root / f"{name}-tp{tp}"
            ck.mkdir()
            write(q, ck, TrtllmOptions(tp=tp))
            out[name][tp] = ck
    return out


class ThreadComm:
    """The collectives of :class:`sqdeploy.runtime.tp.Comm` between threads of one process."""

    def __init__(self, rank: int, shared: dict):
        self.rank, self.shared, self.world = rank, shared, shared["world"]

    def _exchange(self, t: torch.Tensor) -> list[torch.Tensor]:
        self.shared["slots"][self.rank] = t.clone()
        self.shared["barrier"].wait()
        parts = list(self.shared["slots"])
        self.shared["barrier"].wait()
        return parts

    def all_reduce_(self, t):
        parts = self._exchange(t)
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        return t.copy_(total)

    def gather_last(self, t):
        return torch.cat(self._exchange(t), dim=-1)


def _threaded_logits(ckpt_dir, ids) -> torch.Tensor:
    ck = TrtllmCheckpoint(ckpt_dir)
    shared = {"world": ck.tp, "slots": [None] * ck.tp, "barrier": threading.Barrier(ck.tp)}
    models = [build_rank_model(ck, r, torch.device("cpu"), torch.float32, ThreadComm(r, shared)) for r in range(ck.tp)]
    out = [None] * ck.tp

    def run(r):
        with torch.no_grad():
            out[r] = models[r](ids)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(ck.tp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(out[0], out[1])  # every rank holds the gathered logits
    return out[0]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_tp1_equals_checkpoint_reference(checkpoints, recipe):
    ck = TrtllmCheckpoint(checkpoints[recipe][1])
    with torch.no_grad():
        got = build_rank_model(ck, 0, torch.device("cpu"), torch.float32)(IDS)
        assert _rel(got, load_model(ck)(IDS)) < 1e-5


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_tp2_ranks_equal_tp1(checkpoints, recipe):
    with torch.no_grad():
        tp1 = build_rank_model(TrtllmCheckpoint(checkpoints[recipe][1]), 0, torch.device("cpu"), torch.float32)(IDS)
    assert _rel(_threaded_logits(checkpoints[recipe][2], IDS), tp1) < 1e-5


def test_engine_two_processes_over_gloo(checkpoints):
    tp1 = build_rank_model(TrtllmCheckpoint(checkpoints["w8a8-static"][1]), 0, torch.device("cpu"), torch.float32)
    prompt = [IDS[0, :8].tolist()]
    with TPEngine(checkpoints["w8a8-static"][2], device="cpu") as eng:
        assert eng.tp == 2
        with torch.no_grad():
            assert _rel(eng.logits(IDS), tp1(IDS)) < 1e-5
        assert eng.generate(prompt, 8) == greedy_generate(tp1, prompt, 8)


def test_engine_refuses_bad_input(checkpoints, tmp_path):
    with pytest.raises(SqDeployError, match="not a TensorRT-LLM checkpoint"):
        TPEngine(tmp_path, device="cpu")
    if torch.cuda.device_count() < 2:
        with pytest.raises(SqDeployError, match="needs 2 GPUs"):
            TPEngine(checkpoints["fp16"][2], device="cuda")
    with pytest.raises(SqDeployError, match="backend"):
        TPEngine(checkpoints["fp16"][2], device="cpu", backend="nccl")


class _SumOfTwo:
    """A stand-in group of two ranks whose all-reduce doubles the partial sum (both ranks equal)."""

    world = 2

    def all_reduce_(self, t):
        return t.mul_(2)


def test_row_parallel_int8_partial_sums_are_float32():
    """tp N must round a W8A8 layer's output to float16 once, after the all-reduce (as tp 1 does)."""
    from sqdeploy.runtime.tp.parallel import RowParallel
    from sqdeploy.testing.random_weights import VARIANTS, random_linear

    lin = random_linear(64, 128, VARIANTS["w8a8-token"], "cpu")
    x = torch.randn(3, 128, dtype=torch.float16)
    half = lin(x)
    row = RowParallel(lin, None, _SumOfTwo())
    assert lin.out_dtype == torch.float32
    y = row(x)
    assert y.dtype == torch.float16
    exact = lin(x) * 2  # float32 partial sum, reduced, then rounded once
    assert exact.dtype == torch.float32 and torch.equal(y, exact.half())
    assert half.dtype == torch.float16
