"""The process of one tensor-parallel rank: join the group, build the rank's model, serve commands.

Every rank receives the same commands in the same order (so their collectives match
up); rank 0 returns the results. The logits are gathered over the vocabulary on every
rank, so every rank picks the same greedy token without further communication.

A rank started for serving (``serve``: a :class:`~sqdeploy.runtime.backends.kernel.KernelConfig`)
also holds its share of a slot KV cache (:class:`~sqdeploy.runtime.tp.slots.RankSlots`) and
answers ``prefill`` / ``decode`` / ``decode_greedy`` commands, each carrying the slots freed
since the last one.
Ranks ignore SIGINT and SIGTERM, which a terminal or a service manager sends to the whole
process group: the launcher stops them, after draining its requests. They exit on their
own when the launcher dies, so no rank outlives its server.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import traceback

import torch

# NVLink multicast (NVLS) stays off: on shared multi-GPU hosts a program using it can take the GPUs down
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def open_rank_source(path: str):
    """The checkpoint's per-rank reader (TensorRT-LLM checkpoint directories)."""
    from pathlib import Path

    from sqdeploy.core.errors import SqDeployError
    from sqdeploy.formats.trtllm.reader import TrtllmCheckpoint, is_trtllm_dir

    if not is_trtllm_dir(Path(path)):
        raise SqDeployError(
            f"{path} is not a TensorRT-LLM checkpoint (config.json with a mapping + rank0.safetensors); "
            "export one with: sq-export MODEL --target trtllm --tp N --out DIR"
        )
    return TrtllmCheckpoint(path)


def _setup(rank: int, world: int, device_kind: str, backend: str, port: int):
    import torch.distributed as dist

    from sqdeploy.runtime.tp.parallel import Comm

    os.environ.update(NO_MULTICAST)
    init = f"tcp://127.0.0.1:{port}"
    if device_kind == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        extra = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=world, **extra)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        device = torch.device("cpu")
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    return device, Comm(dist.group.WORLD, world, stage_on_cpu=device_kind == "cuda" and backend == "gloo")


def _serve(model, cmd, device, slots=None):
    from sqdeploy.kernels.decode import greedy_generate

    kind = cmd[0]
    if kind in ("prefill", "decode", "decode_greedy"):
        if slots is None:
            raise ValueError(f"{kind!r} needs ranks started for serving (TPEngine(serve=...))")
        slots.forget(cmd[1])
        return getattr(slots, kind)(*cmd[2:])  # rank 0's result goes to the host
    if kind == "logits":
        with torch.no_grad():
            return model(cmd[1].to(device)).cpu()
    if kind == "generate":
        _, prompts, n, use_graph = cmd
        return greedy_generate(model, prompts, n, use_graph=use_graph)
    raise ValueError(f"unknown command {kind!r}")


def _next_command(commands):
    """The next command, or ``("stop",)`` once the launcher is gone (no orphaned ranks)."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    while True:
        try:
            return commands.get(timeout=1.0)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                os._exit(0)  # the group's other ranks are leaving too; nothing to tear down cleanly


def _failure(rank: int, exc: Exception) -> tuple:
    """What the launcher raises: bad input (a :class:`SqDeployError`) as its one line, anything else with its traceback."""
    from sqdeploy.core.errors import SqDeployError

    if isinstance(exc, SqDeployError):
        return ("refused", rank, str(exc))
    return ("error", rank, traceback.format_exc())


def worker_main(rank: int, world: int, path: str, device_kind: str, backend: str, dtype_name: str, port: int,
                commands, results, serve=None) -> None:
    import torch.distributed as dist

    for sig in (signal.SIGINT, signal.SIGTERM):  # the launcher stops the ranks (after a drain); see TPEngine.close
        signal.signal(sig, signal.SIG_IGN)
    try:
        from sqdeploy.kernels.device import check_cuda
        from sqdeploy.runtime.tp.shards import build_rank_model

        device, comm = _setup(rank, world, device_kind, backend, port)
        if device_kind == "cuda":
            check_cuda(device)
        ckpt = open_rank_source(path)
        model = build_rank_model(ckpt, rank, device, getattr(torch, dtype_name), comm)
        slots = None
        if serve is not None:
            from sqdeploy.runtime.tp.slots import RankSlots

            log = lambda msg: print(f"sq-serve: rank {rank}: {msg}", file=sys.stderr, flush=True)  # noqa: E731
            slots = RankSlots(model, serve, log)
        results.put(("ready", rank, None if slots is None else slots.describe()))
    except Exception as exc:  # noqa: BLE001 - reported to the launcher, which stops every rank
        results.put(_failure(rank, exc))
        return
    while True:
        cmd = _next_command(commands)
        if cmd[0] == "stop":
            break
        try:
            out = _serve(model, cmd, device, slots)
            if rank == 0:
                results.put(("ok", rank, out.cpu() if isinstance(out, torch.Tensor) else out))
        except Exception as exc:  # noqa: BLE001
            results.put(_failure(rank, exc))
            break
    dist.destroy_process_group()
