"""What every sq-* command shares: error reporting, calibration options, thread setup."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator

from sqdeploy.core.errors import SqDeployError


class Terminated(KeyboardInterrupt):
    """SIGTERM (docker stop, Kubernetes, Slurm, timeout), raised like Ctrl-C so the same cleanup runs."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn the first SIGTERM into :class:`Terminated`; later ones wait for that cleanup to finish."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run ``main``; a user error becomes one line on stderr and exit code 2, SIGINT/SIGTERM 130/143."""
    prog = os.path.basename(sys.argv[0]) if argv is None else "sq"
    try:
        with _sigterm_as_interrupt():
            code = main(argv)
        return 0 if code is None else int(code)
    except SqDeployError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"{prog}: terminated (SIGTERM); temporary files removed", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; temporary files removed", file=sys.stderr)
        return 130


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 must not silently mean 'the default')."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def add_calibration_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("calibration")
    g.add_argument("--calib", default=None, help="humaneval | pile | c4 | wikitext | a .txt/.jsonl(.gz) file (default: the recipe's)")
    g.add_argument("--calib-samples", type=positive_int, default=None, help="number of calibration sequences (default: recipe, 128)")
    g.add_argument("--calib-seq-len", type=positive_int, default=None,
                   help="tokens per calibration sequence, at most the model's positions (default: recipe, 512)")


def add_runtime_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("runtime")
    g.add_argument("--device", default="cpu", help="device each layer is brought to for calibration (cpu, cuda, cuda:1)")
    g.add_argument("--batch", type=int, default=8, help="calibration sequences per forward pass")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: all cores)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def calibration_from(args: argparse.Namespace):
    from sqdeploy.quantize.pipeline import Calibration

    return Calibration(args.calib, args.calib_samples, args.calib_seq_len)


def runtime_from(args: argparse.Namespace):
    import torch

    from sqdeploy.quantize.pipeline import Runtime

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SqDeployError(f"--device {args.device}: no CUDA GPU is visible; use --device cpu")
    return Runtime(device=args.device, batch=args.batch, progress=not args.quiet)  # one line per step when not a TTY


def add_kernel_options(ap: argparse.ArgumentParser) -> None:
    """KV cache and decode options of the kernel backend (HF / quantized directories on a GPU) and of the tp one."""
    g = ap.add_argument_group("kernel and tp backends (GPU; with --tp, per GPU)")
    g.add_argument("--kv-cache-gib", type=float, default=None,
                   help="KV cache size in GiB (default: what --gpu-memory-fraction leaves once the model is loaded)")
    g.add_argument("--gpu-memory-fraction", type=float, default=None,
                   help="share of the GPU's memory this process may fill, model and KV cache together (default 0.9)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="positions per sequence in the KV cache (default: the model's context)")
    g.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly instead of replaying CUDA graphs")
    g.add_argument("--dtype", default=None, choices=["float16", "bfloat16"], help="activation dtype (default float16)")


def kernel_options(args):
    from sqdeploy.runtime import KernelOptions

    return KernelOptions(
        kv_cache_gib=getattr(args, "kv_cache_gib", None),
        gpu_memory_fraction=getattr(args, "gpu_memory_fraction", None),
        max_model_len=getattr(args, "max_model_len", None),
        cuda_graphs=not getattr(args, "no_cuda_graphs", False),
        dtype=getattr(args, "dtype", None),
    )
