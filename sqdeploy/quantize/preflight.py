"""Checks before the long work: is there disk for the output, and GPU memory for one layer?

An export of a 7B-70B model runs for minutes to hours; running out of disk while the
last rank file is written, or out of GPU memory at the first layer after the calibration
set was tokenized and embedded, wastes all of it. Both are estimated from the model's
config and the recipe alone and refused with one line before calibration starts, before
anything is written.

* Disk: the bytes the export writes on ``--out``'s filesystem, the intermediate quantized
  model (written beside ``--out``) included, with a 5% margin (:func:`output_bytes`).
* GPU: a lower bound of what calibrating one layer needs (:func:`gpu_bytes_needed`): the
  layer in float32, the calibration set's hidden states (its inputs and outputs, float32:
  they stay on the GPU between layers), one chunk of calibration activations through it
  (hidden states, MLP intermediates, attention scores) and one Hessian (float64 sums) for
  GPTQ. A GPU with less free memory
  than that cannot run the export; one with more may still need the margin the caching
  allocator takes, which is why this is only a lower bound.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.families import ModelConfig
from sqdeploy.core.schemes import QuantScheme

MARGIN = 1.05
GiB = 2**30


def linear_bytes(out_f: int, in_f: int, scheme: QuantScheme, float_bytes: int) -> int:
    """Stored bytes of one linear: integer weights (INT4 packed two per byte) and their scales/zero points."""
    ws = scheme.weight
    if ws is None:
        return out_f * in_f * float_bytes
    n = out_f * in_f * ws.bits // 8
    groups = in_f // ws.group_size if ws.granularity == "group" else 1
    per_scale = 4 + (0 if ws.symmetric else 4)  # float32 scale (+ zero point), an upper bound
    return n + out_f * groups * per_scale


def quantized_model_bytes(cfg: ModelConfig, scheme: QuantScheme, dtype: torch.dtype) -> int:
    """About the size of the quantized model directory: the linears, norms and embeddings."""
    fb = torch.empty((), dtype=dtype).element_size()
    per_layer = sum(linear_bytes(*cfg.linear_shape(n), scheme, fb) for n in cfg.linears) + 4 * cfg.hidden_size * fb
    embeddings = cfg.vocab_size * cfg.hidden_size * fb * (1 if cfg.tie_embeddings else 2)
    return cfg.num_layers * per_layer + embeddings


def output_bytes(cfg: ModelConfig, scheme: QuantScheme, dtype: torch.dtype, target_copies: float = 0.0,
                 target_extra: int = 0) -> int:
    """Bytes written on ``--out``'s disk: the quantized model, ``target_copies`` times its size for
    the export target, plus ``target_extra`` (e.g. embeddings replicated on every rank)."""
    q = quantized_model_bytes(cfg, scheme, dtype)
    return int((q * (1 + target_copies) + target_extra) * MARGIN)


def check_disk(out: str | Path, needed: int) -> None:
    """Refuse an ``out`` whose filesystem has less free space than ``needed`` bytes."""
    where = Path(out).absolute()
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise SqDeployError(f"not enough free disk for --out {out}: the export writes about {needed / GiB:.1f} GiB "
                            f"there, {free / GiB:.1f} GiB are free on {probe}; free space or choose --out on another disk")


def gpu_bytes_needed(cfg: ModelConfig, batch: int, seq_len: int, hessian: bool, samples: int = 0) -> int:
    """Lower bound of the GPU memory calibrating one layer takes (float32 throughout): the layer, the
    hidden states of the ``samples`` calibration sequences in and out of it, one chunk's activations
    and, for GPTQ, the widest input's ``x^T x`` sum (float64)."""
    layer = sum(o * i for o, i in (cfg.linear_shape(n) for n in cfg.linears)) * 4
    tokens = batch * seq_len
    acts = tokens * (4 * cfg.hidden_size + 3 * cfg.intermediate_size) * 4 + batch * cfg.num_heads * seq_len * seq_len * 4
    streams = 2 * samples * seq_len * cfg.hidden_size * 4
    widest = max(i for _, i in (cfg.linear_shape(n) for n in cfg.linears))
    return layer + acts + streams + (widest * widest * 8 if hessian else 0)


def gpu_free_bytes(device: str) -> tuple[int, int]:
    """(free, total) bytes of the CUDA device."""
    return torch.cuda.mem_get_info(torch.device(device))


def check_gpu(device: str, cfg: ModelConfig, batch: int, seq_len: int, hessian: bool, samples: int = 0) -> None:
    """Refuse a GPU with less free memory than one layer and its calibration activations need."""
    if not str(device).startswith("cuda"):
        return
    need = gpu_bytes_needed(cfg, batch, seq_len, hessian, samples)
    free, total = gpu_free_bytes(device)
    if free < need:
        raise SqDeployError(f"--device {device} has {free / GiB:.1f} GiB free (of {total / GiB:.1f} GiB), and one layer of "
                            f"this model with its calibration activations needs at least {need / GiB:.1f} GiB; use a larger "
                            f"GPU, a smaller --batch (now {batch}), --calib-samples (now {samples}) or --calib-seq-len (now {seq_len}), "
                            "or --device cpu")
