"""Run a tensor-parallel checkpoint as N processes, one GPU (or CPU share) each.

    with TPEngine("ckpt-tp2", device="cuda") as eng:     # NCCL, GPUs 0 and 1
        logits = eng.logits(ids)                           # [B, T, V] float32
        tokens = eng.generate([[1, 2, 3]], 32)             # greedy

``device="cpu"`` runs the same ranks over gloo with the exact PyTorch arithmetic of
the kernels (how the test suite checks the tensor-parallel logic without GPUs).

``serve=KernelConfig(...)`` also gives every rank its share of a slot KV cache for the
server's whole life (see :mod:`sqdeploy.runtime.backends.tp`): :meth:`TPEngine.prefill`
and :meth:`TPEngine.decode` then run one prompt chunk or one decode step on all ranks
and return rank 0's float32 logits.
"""

from __future__ import annotations

import os
import queue
import socket
import sys
import time

import torch

from sqdeploy.core.errors import SqDeployError
from sqdeploy.runtime.tp.worker import NO_MULTICAST, open_rank_source, worker_main


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TPEngine:
    def __init__(self, path: str, device: str = "cuda", dtype: torch.dtype | None = None, timeout: float = 600.0,
                 backend: str | None = None, serve=None):
        """``backend``: ``nccl`` (default on CUDA, one GPU per rank) or ``gloo`` (default on CPU; on CUDA it
        places ranks round-robin on the visible GPUs, which lets a single-GPU machine check the sharded
        kernels; it is not a fast path)."""
        ckpt = open_rank_source(str(path))  # validates the directory before any process starts
        self.tp, self.config, self.timeout = ckpt.tp, ckpt.config, timeout
        self._procs: list = []
        self.slots: dict | None = None  # with ``serve``: the cache every rank holds (slots, max_len, plan)
        if device not in ("cuda", "cpu"):
            raise SqDeployError(f"device {device!r}: the tensor-parallel engine runs on 'cuda' (NCCL) or 'cpu' (gloo)")
        backend = backend or ("nccl" if device == "cuda" else "gloo")
        if backend not in ("nccl", "gloo") or (backend == "nccl" and device != "cuda"):
            raise SqDeployError(f"backend {backend!r} with device {device!r}: use nccl on cuda, or gloo")
        if backend == "nccl":
            from sqdeploy.kernels.device import check_gpus_for_tp

            check_gpus_for_tp(self.tp)
        dtype = dtype or (torch.float16 if device == "cuda" else torch.float32)
        os.environ.update(NO_MULTICAST)  # inherited by the rank processes
        ctx = torch.multiprocessing.get_context("spawn")
        self._commands = [ctx.Queue() for _ in range(self.tp)]
        self._results = ctx.Queue()
        port = _free_port()
        dtype_name = str(dtype).replace("torch.", "")
        self._procs = [
            ctx.Process(target=worker_main, args=(r, self.tp, str(path), device, backend, dtype_name, port,
                                                  self._commands[r], self._results, serve), daemon=True)
            for r in range(self.tp)
        ]
        for p in self._procs:
            p.start()
        try:
            for _ in range(self.tp):
                self.slots = self._wait("ready")
        except BaseException:
            self.close(force=True)
            raise

    def _wait(self, expect: str):
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            try:
                kind, rank, payload = self._results.get(timeout=0.5)
            except queue.Empty:
                dead = [i for i, p in enumerate(self._procs) if not p.is_alive()]
                if dead:
                    raise SqDeployError(f"tensor-parallel rank {dead[0]} exited (code {self._procs[dead[0]].exitcode})")
                continue
            if kind == "refused":
                raise SqDeployError(payload)
            if kind == "error":  # the traceback goes to the log, its last line to whoever waits (an HTTP client)
                print(f"tensor-parallel rank {rank} failed:\n{payload}", file=sys.stderr, flush=True)
                last = payload.strip().splitlines()[-1]
                raise SqDeployError(f"tensor-parallel rank {rank} failed: {last}")
            if kind == expect:
                return payload
        raise SqDeployError(f"tensor-parallel ranks did not answer within {self.timeout:.0f}s")

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def _call(self, cmd: tuple):
        if not self._procs:
            raise SqDeployError("the tensor-parallel ranks have stopped (see the error above); restart the engine")
        for q in self._commands:
            q.put(cmd)
        try:
            return self._wait("ok")
        except BaseException:
            self.close(force=True)
            raise

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[B, T, V]`` of whole sequences (no cache)."""
        return self._call(("logits", input_ids.cpu()))

    def generate(self, prompts: list[list[int]], max_new_tokens: int, use_graph: bool = False) -> list[list[int]]:
        """Greedy continuations of equal-length prompts (CUDA graphs across NCCL collectives: ``use_graph``)."""
        return self._call(("generate", prompts, max_new_tokens, use_graph))

    def prefill(self, freed: list[int], slot: int, ids: list[int], start: int) -> torch.Tensor:
        """Forget slots ``freed``, then run prompt tokens ``ids`` of ``slot`` at positions ``start ..``;
        float32 logits [V] of the last one (ranks started with ``serve``)."""
        return self._call(("prefill", list(freed), int(slot), list(ids), int(start)))

    def decode(self, freed: list[int], slots: list[int], next_ids: list[int]) -> torch.Tensor:
        """Forget slots ``freed``, then one decode step of ``slots`` fed ``next_ids``; float32 logits [n, V]."""
        return self._call(("decode", list(freed), list(slots), list(next_ids)))

    def decode_greedy(self, freed: list[int], slots: list[int], next_ids: list[int]) -> torch.Tensor:
        """As :meth:`decode`, but only the greedy next ids [n] come back."""
        return self._call(("decode_greedy", list(freed), list(slots), list(next_ids)))

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def close(self, force: bool = False) -> None:
        """Stop every rank (``force``: at once, without letting them finish their command)."""
        if not self._procs:
            return
        if not force:
            for q in self._commands:
                q.put(("stop",))
        for p in self._procs:
            p.join(timeout=0 if force else 30)
            if p.is_alive():
                p.kill()  # ranks ignore SIGTERM
                p.join(timeout=10)
        self._procs = []

    def __enter__(self) -> "TPEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close(force=exc[0] is not None)
