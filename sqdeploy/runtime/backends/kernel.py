"""The GPU serving backend: the kernel model (real INT8/INT4 linears, fused norms, flash-decoding)
over a device-resident slot KV cache, decode steps replayed from CUDA graphs.

Unlike the step backends (``forward`` over a left-padded batch whose cache the scheduler
rearranges), this one owns its cache: :class:`~sqdeploy.runtime.slot_batching.SlotScheduler`
asks it for a slot per request, feeds prompts in chunks, runs one decode step for every
decoding slot and samples on the device (:mod:`..device_sampling`). On the CPU the same
code runs the kernels' exact PyTorch arithmetic, which is how the test suite checks it.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sqdeploy.core.errors import SqDeployError
from sqdeploy.runtime.backends.base import ModelInfo, eos_ids_of, load_tokenizer
from sqdeploy.runtime.device_sampling import DeviceSampler

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class KernelConfig:
    """Cache sizing and decode options.

    ``kv_cache_gib`` fixes the cache's size; otherwise on a GPU the cache takes what is left of
    ``gpu_memory_fraction`` of the device's memory once the model is loaded (minus room for
    activations), and on the CPU it holds ``max_batch_size`` full-length sequences.
    ``max_model_len`` caps the positions per sequence (default: the model's context).
    ``capture_at_start`` captures every decode bucket's CUDA graph before serving, so no request
    waits for a capture.
    """

    max_batch_size: int = 8
    max_prefill_tokens: int = 4096
    kv_cache_gib: float | None = None
    gpu_memory_fraction: float | None = None
    max_model_len: int | None = None
    cuda_graphs: bool = True
    dtype: str | None = None
    seed: int | None = None
    capture_at_start: bool = False

    def __post_init__(self):
        if self.kv_cache_gib is not None and self.kv_cache_gib <= 0:
            raise SqDeployError(f"--kv-cache-gib must be > 0 (got {self.kv_cache_gib})")
        if self.gpu_memory_fraction is not None and not 0 < self.gpu_memory_fraction <= 1:
            raise SqDeployError(f"--gpu-memory-fraction must be in (0, 1] (got {self.gpu_memory_fraction})")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise SqDeployError(f"--max-model-len must be >= 2 (got {self.max_model_len})")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise SqDeployError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")


def load_kernel_model(path: Path, device: str, dtype: torch.dtype | None):
    """The kernel model of an HF or quantized directory, the directory of its tokenizer and a description."""
    from sqdeploy.kernels import load_for_device
    from sqdeploy.model.checkpoint import HFCheckpoint
    from sqdeploy.quantize.qmodel import QuantizedModel, is_quantized_dir

    if not path.is_dir():
        raise SqDeployError(f"model directory {path} does not exist")
    if is_quantized_dir(path):
        source, kind = QuantizedModel(path), "quantized"
    elif (path / "config.json").exists():
        source, kind = HFCheckpoint(path), "hf"
    else:
        raise SqDeployError(f"{path} is not an HF or quantized model directory; the kernel backend serves only those "
                            "(use --backend onnxruntime or trtllm for exports)")
    model = load_for_device(source, device, dtype)
    scheme = getattr(source, "scheme", None)
    recipe = getattr(source, "recipe", None)
    what = "float" if scheme is None or scheme.is_float else (recipe.name if recipe is not None else scheme.describe())
    return model, path, f"{kind}: {source.config.architecture} ({what}, kernels)"


def is_model_dir(path: Path) -> bool:
    """An HF or quantized directory: what the kernel backend can serve."""
    from sqdeploy.quantize.qmodel import is_quantized_dir

    return path.is_dir() and (is_quantized_dir(path) or (path / "config.json").exists())


def check_device(device: str) -> torch.device:
    """``cuda[:N]`` that exists (never a silent fall back to the CPU), or ``cpu``."""
    from sqdeploy.kernels.device import check_cuda

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise SqDeployError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from e
    if dev.type == "cuda":
        check_cuda(dev)
        return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())
    if dev.type != "cpu":
        raise SqDeployError(f"--device {device}: the kernel backend runs on cuda or cpu")
    return dev


def activation_reserve(model, max_prefill_tokens: int, max_batch: int) -> int:
    """Bytes kept free for one prefill chunk's activations, the decode logits and the graphs' memory."""
    cfg = model.cfg
    width = cfg.hidden_size * 4 + cfg.intermediate_size * 3 + cfg.q_size + 2 * cfg.kv_size
    elem = model.embed.weight.element_size()
    return max_prefill_tokens * width * elem * 2 + max(max_batch, 64) * cfg.vocab_size * 4 * 4 + (512 << 20)


def kv_budget(model, device: torch.device, config: KernelConfig) -> int | None:
    """The cache's byte budget (None: no budget, the CPU default)."""
    if config.kv_cache_gib is not None:
        return int(config.kv_cache_gib * (1 << 30))
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    frac = 0.9 if config.gpu_memory_fraction is None else config.gpu_memory_fraction
    return int(frac * total - (total - free) - activation_reserve(model, config.max_prefill_tokens, config.max_batch_size))


class KernelBackend:
    """Slot-level model operations for :class:`~sqdeploy.runtime.slot_batching.SlotScheduler`."""

    name = "kernel"
    slot_based = True

    def __init__(self, path: str | Path | None = None, device: str = "cuda", config: KernelConfig = KernelConfig(),
                 threads: int | None = None, *, model=None, tokenizer=None, description: str | None = None,
                 log=None):
        from sqdeploy.kernels.slots import SlotCache, SlotDecoder, kv_bytes_per_token, plan_slots

        self.log = log or (lambda msg: print(f"sq-serve: {msg}", file=sys.stderr, flush=True))
        self.device = check_device(device)
        if threads:
            torch.set_num_threads(threads)
        self.config = config
        dtype = DTYPES[config.dtype] if config.dtype else None
        if model is None:
            with self._on_device():
                model, tok_path, description = load_kernel_model(Path(path), str(self.device), dtype)
            tokenizer = load_tokenizer(tok_path)
        else:
            tok_path = Path(path) if path is not None else Path(".")
        self.model, self.tokenizer = model, tokenizer
        cfg = model.cfg
        max_len = min(cfg.max_positions, config.max_model_len or cfg.max_positions)
        plan = plan_slots(kv_bytes_per_token(model), max_len, config.max_batch_size, kv_budget(model, self.device, config))
        self.cache = SlotCache(model, plan)
        self.decoder = SlotDecoder(model, self.cache, config.cuda_graphs, self.log)
        self.sampler = DeviceSampler(self.device, config.seed)
        self.log(plan.describe())
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else (getattr(tokenizer, "pad_token_id", None) or 0)
        self.info = ModelInfo(
            path=Path(path) if path is not None else Path("."),
            description=description or "kernel model",
            vocab_size=cfg.vocab_size,
            max_positions=plan.max_len,
            num_layers=cfg.num_layers,
            eos_ids=eos_ids_of(cfg.eos_token_id, getattr(tokenizer, "eos_token_id", None)),
            pad_id=int(pad),
            tokenizer_path=tok_path,
        )
        self._active: tuple[int, ...] = ()
        self._active_idx: torch.Tensor | None = None
        if config.capture_at_start and self.decoder.use_graphs:
            t0 = time.perf_counter()
            sizes = self.warmup()
            self.log(f"decode steps captured in CUDA graphs for batch sizes {sizes} ({time.perf_counter() - t0:.1f} s)")

    # -- slots
    def free_slots(self) -> int:
        return self.cache.free

    def acquire(self) -> int:
        return self.cache.acquire()

    def release(self, slot: int) -> None:
        self.cache.release(slot)
        self._active = ()  # the active flags are rewritten before the next decode step

    # -- model steps
    def prefill(self, slot: int, ids: Sequence[int], start: int) -> torch.Tensor:
        """Prompt tokens of one slot at positions ``start ..``; float32 logits of the last one [V] (on the device)."""
        from sqdeploy.kernels.slots import prefill_chunk

        with self._on_device():
            return prefill_chunk(self.model, self.cache, slot, torch.tensor(list(ids), dtype=torch.long), start)

    def prefill_rows(self, slots: Sequence[int], ids: Sequence[Sequence[int]], start: int) -> torch.Tensor:
        """Equal-length prompt chunks of several slots at positions ``start ..``, as one batch; float32 logits
        of each row's last token [B, V] (on the device)."""
        from sqdeploy.kernels.slots import prefill_rows

        with self._on_device():
            return prefill_rows(self.model, self.cache, list(slots), torch.tensor([list(r) for r in ids], dtype=torch.long),
                                start)

    def _on_device(self):
        """The backend's GPU as the current device: Triton launches on the current one, and the engine's
        worker thread starts on GPU 0 whatever ``cuda:N`` was asked for."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def slot_index(self, slots: Sequence[int]) -> torch.Tensor:
        """``slots`` as a device index tensor; the decoding set's is kept, and the active flags follow it."""
        key = tuple(slots)
        if key != self._active or self._active_idx is None:
            idx = torch.tensor(key, dtype=torch.long, device=self.device)
            self.cache.active.zero_()
            self.cache.active[idx] = 1
            self._active, self._active_idx = key, idx
        return self._active_idx

    def set_next(self, idx: torch.Tensor, tokens: torch.Tensor) -> None:
        """The next decode input of slots ``idx``: their sampled tokens, without leaving the device."""
        self.cache.next_ids[idx] = tokens

    def decode(self, slots: Sequence[int]) -> torch.Tensor:
        """One decode step of ``slots`` (all decoding rows); float32 logits ``[len(slots), V]`` in their order."""
        idx = self.slot_index(slots)
        with self._on_device():
            logits = self.decoder.step(list(slots))
        return logits.index_select(0, idx)

    def warmup(self) -> list[int]:
        """Capture every decode bucket now rather than at its first use; returns the captured sizes."""
        with self._on_device():
            return self.decoder.capture_all()
