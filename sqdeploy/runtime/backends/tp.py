"""The tensor-parallel serving backend: a TensorRT-LLM checkpoint's ranks behind the slot scheduler.

``sq-serve CKPT --tp N`` starts the N rank processes of :mod:`sqdeploy.runtime.tp` once,
for the server's whole life (NCCL with one GPU per rank on ``cuda``, gloo on ``cpu``).
Each rank builds its shard of the kernel model and its share of a slot KV cache (its own
KV heads); this process keeps the slot bookkeeping, exactly as the single-GPU kernel
backend does, so :class:`~sqdeploy.runtime.slot_batching.SlotScheduler` drives both the
same way: a prompt chunk writes only its own slot on every rank, a decode step advances
every decoding slot by one token, and a finished request frees only its slot (the ranks
learn that with the next command). Only rank 0's results come back: the greedy token ids
of a decode step whose rows all decode greedily, else the gathered float32 logits of the
rows in the step, sampled here on the CPU (temperature, top-k, top-p, seeds, penalties).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from sqdeploy.core.errors import SqDeployError
from sqdeploy.runtime.backends.base import ModelInfo, eos_ids_of, load_tokenizer
from sqdeploy.runtime.backends.kernel import DTYPES, KernelConfig
from sqdeploy.runtime.device_sampling import DeviceSampler


def checkpoint_tp(path: str | Path) -> int | None:
    """The tensor-parallel size of a TensorRT-LLM checkpoint directory (None: not one)."""
    import json

    from sqdeploy.formats.trtllm.reader import is_trtllm_dir

    p = Path(path)
    if not p.is_dir() or not is_trtllm_dir(p):
        return None
    mapping = json.loads((p / "config.json").read_text()).get("mapping") or {}
    return int(mapping.get("tp_size", mapping.get("world_size", 1)) or 1)


def check_tp_request(path: str | Path, tp: int | None) -> int:
    """The checkpoint's tp, refused with the remedy when ``path`` is no TensorRT-LLM checkpoint or ``tp`` differs."""
    have = checkpoint_tp(path)
    if have is None:
        raise SqDeployError(f"--tp needs a TensorRT-LLM checkpoint, and {path} is not one (config.json with a mapping "
                            "+ rank0.safetensors); export one with: sq-export MODEL --target trtllm --tp N --out DIR")
    if tp is not None and tp != have:
        raise SqDeployError(f"{path} was exported for tp {have}, not --tp {tp}; pass --tp {have} or re-export with "
                            f"sq-export MODEL --target trtllm --tp {tp}")
    return have


def tp_device(device: str) -> str:
    """``cuda`` (NCCL, rank r on visible GPU r) or ``cpu`` (gloo); ``auto``: cuda when a GPU is visible."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda:"):
        raise SqDeployError(f"--device {device} with --tp: rank r runs on visible GPU r; use --device cuda and pick "
                            "the GPUs with CUDA_VISIBLE_DEVICES")
    if device not in ("cuda", "cpu"):
        raise SqDeployError(f"--device {device!r} with --tp: use cuda (NCCL) or cpu (gloo)")
    return device


class TPBackend:
    """Slot-level model operations over the ranks, for :class:`~sqdeploy.runtime.slot_batching.SlotScheduler`."""

    name = "tp"
    slot_based = True

    def __init__(self, path: str | Path, device: str = "cuda", config: KernelConfig = KernelConfig(),
                 tp: int | None = None, timeout: float = 600.0, log=None):
        from sqdeploy.runtime.tp import TPEngine

        self.log = log or (lambda msg: print(f"sq-serve: {msg}", file=sys.stderr, flush=True))
        path = Path(path)
        self.tp = check_tp_request(path, tp)
        device = tp_device(device)
        self.device = torch.device("cpu")  # where the logits arrive and sampling runs
        self.config = config
        self.tokenizer = load_tokenizer(path)
        dtype = DTYPES[config.dtype] if config.dtype and device == "cuda" else None
        self.ranks = TPEngine(path, device=device, dtype=dtype, timeout=timeout, serve=config)
        try:
            cfg = self.ranks.config
            plan = self.ranks.slots
            self.slots, self.max_len = int(plan["slots"]), int(plan["max_len"])
            self.log(f"tp {self.tp} over {'NCCL' if device == 'cuda' else 'gloo'}; per rank {plan['plan']}")
            pad = cfg.pad_token_id if cfg.pad_token_id is not None else (getattr(self.tokenizer, "pad_token_id", None) or 0)
            self.info = ModelInfo(
                path=path,
                description=f"TensorRT-LLM checkpoint: {cfg.architecture} (tp {self.tp}, {device}, kernels)",
                vocab_size=cfg.vocab_size,
                max_positions=self.max_len,
                num_layers=cfg.num_layers,
                eos_ids=eos_ids_of(cfg.eos_token_id, getattr(self.tokenizer, "eos_token_id", None)),
                pad_id=int(pad),
                tokenizer_path=path,
            )
        except BaseException:
            self.ranks.close(force=True)
            raise
        self.sampler = DeviceSampler(self.device, config.seed)
        self._free = list(range(self.slots))
        self._lengths = [0] * self.slots
        self._next = [0] * self.slots
        self._freed: list[int] = []  # released here, not yet told to the ranks

    # -- slots (bookkeeping here; the ranks hear of a release with the next command)
    def free_slots(self) -> int:
        return len(self._free)

    def acquire(self) -> int:
        if not self._free:
            raise SqDeployError("no free KV cache slot; the scheduler admits only while one is free")
        self._free.sort()  # lowest first: live slots stay packed at the front, decode buckets stay small
        return self._free.pop(0)

    def release(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.slots:
            raise SqDeployError(f"slot {slot} is not in use")
        self._lengths[slot] = 0
        self._free.append(slot)
        self._freed.append(slot)

    def _take_freed(self) -> list[int]:
        freed, self._freed = self._freed, []
        return freed

    # -- model steps
    def prefill(self, slot: int, ids: Sequence[int], start: int) -> torch.Tensor:
        """Prompt tokens of one slot at positions ``start ..``; float32 logits of the last one [V]."""
        ids = [int(t) for t in ids]
        if start != self._lengths[slot]:
            raise SqDeployError(f"slot {slot} holds {self._lengths[slot]} positions; a chunk at {start} would leave a gap")
        if start + len(ids) > self.max_len:
            raise SqDeployError(f"slot {slot} holds {self.max_len} positions; {start + len(ids)} needed")
        logits = self.ranks.prefill(self._take_freed(), slot, ids, start)
        self._lengths[slot] = start + len(ids)
        return logits

    def slot_index(self, slots: Sequence[int]) -> torch.Tensor:
        return torch.tensor(list(slots), dtype=torch.long)

    def set_next(self, idx: torch.Tensor, tokens: torch.Tensor) -> None:
        """The next decode input of slots ``idx``; sent to the ranks with the next decode step."""
        for s, t in zip(idx.tolist(), tokens.tolist()):
            self._next[s] = int(t)

    def decode(self, slots: Sequence[int]) -> torch.Tensor:
        """One decode step of ``slots`` (all decoding rows); float32 logits ``[len(slots), V]`` in their order."""
        return self._step(self.ranks.decode, slots)

    def decode_greedy(self, slots: Sequence[int]) -> torch.Tensor:
        """One decode step of rows that all decode greedily (no penalty, no ``min_tokens`` mask): rank 0 picks
        the tokens, and only their ids [len(slots)] come back."""
        return self._step(self.ranks.decode_greedy, slots)

    def _step(self, call, slots: Sequence[int]) -> torch.Tensor:
        slots = list(slots)
        full = [s for s in slots if self._lengths[s] >= self.max_len]
        if full:
            raise SqDeployError(f"slot {full[0]} is full ({self.max_len} positions); the request should have ended")
        out = call(self._take_freed(), slots, [self._next[s] for s in slots])
        for s in slots:
            self._lengths[s] += 1
        return out

    @property
    def healthy(self) -> bool:
        """Every rank is running (a rank that died takes the others down: the server then reports not ready)."""
        return self.ranks.alive

    def close(self) -> None:
        """Stop the ranks (they finish the command they run)."""
        self.ranks.close()
