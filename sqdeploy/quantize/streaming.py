"""The layer-streaming driver: one decoder layer in memory at a time.

The calibration inputs of layer ``i`` (hidden states, float32) are kept on the compute
device; layer ``i`` alone is read from safetensors, brought to that device and run
(collecting per-input-channel statistics through hooks), handed to the algorithm, and
its outputs become the inputs of layer ``i + 1``. Peak memory is one layer plus the
activations, so models larger than RAM or GPU memory can be processed.

With ``--device cuda`` everything that grows with the calibration set stays on the GPU:
the activation streams, the statistics and GPTQ's ``x^T x`` sums (float64) are made and
accumulated where the layer runs, and nothing of them crosses to the host; the host holds
the embedding table while the calibration set is embedded, the tensor being read and the
layer being written. Nothing is kept per layer beyond a few numbers for the manifest, so
neither memory grows with depth.

Two activation streams can be propagated: the *float* stream (the unquantized model)
and the *quantized* stream (the model with layers ``< i`` already quantized), for
algorithms whose loss should see the error that earlier layers accumulate.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator, Protocol

import torch

from sqdeploy.core import phases
from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.progress import Progress
from sqdeploy.model.loading import TensorSource, load_block, load_model
from sqdeploy.model.transformer import Block, Context, Transformer


@dataclass
class ChannelStats:
    """Per-input-channel activation statistics of one linear over the calibration set."""

    absmax: torch.Tensor
    abssum: torch.Tensor
    tokens: int = 0
    xtx: torch.Tensor | None = None  # sum of x x^T (float64), when GPTQ will round the weights

    @property
    def absmean(self) -> torch.Tensor:
        return self.abssum / max(self.tokens, 1)

    @property
    def hessian(self) -> torch.Tensor | None:
        """GPTQ's H = 2 X^T X / n."""
        return None if self.xtx is None else (2.0 * self.xtx / max(self.tokens, 1)).float()

    def scaled(self, s_in: torch.Tensor, xtx: torch.Tensor | None = None, with_xtx: bool = True) -> "ChannelStats":
        """Statistics of the input divided by ``s_in`` per channel (after smoothing). ``xtx``: the
        already scaled ``x^T x`` of another linear reading the same input (shared, not recomputed);
        ``with_xtx=False`` drops it (a round-to-nearest trial needs no Hessian)."""
        s_in = s_in.to(self.absmax.device)
        if not with_xtx or self.xtx is None:
            xtx = None
        elif xtx is None:
            xtx = self.xtx / torch.outer(s_in, s_in).double()
        return ChannelStats(self.absmax / s_in, self.abssum / s_in, self.tokens, xtx)


class StatsCollector:
    """Hooks on a block's linears (and its attention's K/V) that accumulate statistics."""

    def __init__(self, block: Block, linears: Iterable[str], hessian: bool = False):
        self.block = block
        self.hessian = hessian
        self.stats: dict[str, ChannelStats] = {}
        self.kv_amax = torch.zeros(2)
        self._last_xtx: tuple[torch.Tensor, torch.Tensor] | None = None
        self._handles = [block.linear(n).register_forward_pre_hook(self._hook(n)) for n in linears]
        block.attn.kv_observer = self._observe_kv

    def _hook(self, name: str) -> Callable:
        def hook(_module, args):
            raw = args[0].detach().float().reshape(-1, args[0].shape[-1])
            x = raw.abs()
            s = self.stats.get(name)
            # on the layer's device: a host copy per batch would synchronise the device for each linear
            amax, asum = x.amax(0), x.sum(0, dtype=torch.float64).float()
            xtx = self._accumulate(args[0], raw, None if s is None else s.xtx) if self.hessian else None
            if s is None:
                self.stats[name] = ChannelStats(amax, asum, x.shape[0], xtx)
            else:
                s.absmax = torch.maximum(s.absmax, amax)
                s.abssum += asum
                s.tokens += x.shape[0]

        return hook

    def _accumulate(self, tensor: torch.Tensor, raw: torch.Tensor, acc: torch.Tensor | None) -> torch.Tensor:
        """The running x^T x (float64) of this input. Linears fed the same tensor (q/k/v, gate/up)
        share one accumulator, added to once per batch: a 1B model's layer holds 0.45 GB of these
        in float64 when each linear keeps its own copy. The sum stays on the layer's device, and
        the float32 product is added into it in place (each element widened to float64 as it is
        added, the same sums as adding a float64 copy): a 7B model's ``down_proj`` input would
        otherwise cross to the host as a 1 GB float64 matrix for every batch."""
        if self._last_xtx is not None and self._last_xtx[0] is tensor:
            return self._last_xtx[1]
        xtx = raw.t() @ raw
        if acc is None:
            acc = xtx.double()
        else:
            acc += xtx
        self._last_xtx = (tensor, acc)
        return acc

    def _observe_kv(self, k: torch.Tensor, v: torch.Tensor) -> None:
        seen = torch.stack([k.abs().amax().float(), v.abs().amax().float()])
        self.kv_amax = torch.maximum(self.kv_amax.to(seen.device), seen)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self.block.attn.kv_observer = None
        self._last_xtx = None  # the stats hold the sums; keep no second reference to free them by

    def __enter__(self) -> "StatsCollector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_block(block: Block, chunks: list[torch.Tensor], ctx: Context, device: torch.device) -> list[torch.Tensor]:
    """Run ``block`` over activation chunks; the outputs (float32) stay on ``device`` for the next layer."""
    out = []
    with torch.no_grad():
        for x in chunks:
            out.append(block(x.to(device), ctx).float())
    return out


def run_block_in_place(block: Block, chunks: list[torch.Tensor], ctx: Context, device: torch.device) -> None:
    """:func:`run_block` replacing each chunk by its output as it goes: one chunk more than the
    stream, not a second copy of it."""
    with torch.no_grad():
        for k, x in enumerate(chunks):
            chunks[k] = block(x.to(device), ctx).float()


ERROR_SEQUENCES = 16  # calibration sequences the reported per-layer error is measured on


def block_error(block: Block, chunks: list[torch.Tensor], ref: list[torch.Tensor], ctx: Context, device: torch.device,
                sequences: int = ERROR_SEQUENCES) -> float:
    """:func:`relative_error` of ``block``'s outputs against ``ref`` on the first chunks holding ``sequences``
    calibration sequences, one output chunk at a time (the same sums in the same order, without holding the
    outputs). The number is a diagnostic (the summary's and the manifest's per-layer error; nothing is chosen
    by it): 16 sequences of 512 tokens measure a relative error to a few percent of itself, and the extra
    forward over the whole calibration set it replaces was a fifth of a 7B layer's export time on a GPU."""
    num, den = 0, 0
    with torch.no_grad():
        for x, y in zip(first_sequences(chunks, sequences), ref):
            out = block(x.to(device), ctx).float()
            num += float((out - y).pow(2).sum())
            den += float(y.pow(2).sum())
            del out
    return num / max(den, 1e-30)


def check_finite(chunks: list[torch.Tensor], where: str) -> None:
    for x in chunks:
        if not torch.isfinite(x).all():
            raise SqDeployError(
                f"calibration activations {where} contain NaN or Inf; the weights overflow or are damaged "
                "(check the checkpoint, or calibrate in float32 with --calib-dtype float32)"
            )


def relative_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Relative MSE of the chunks of ``a`` against the same chunks of ``b`` (``b`` may hold more)."""
    pairs = list(zip(a, b))
    num = sum(float((x - y).pow(2).sum()) for x, y in pairs)
    den = sum(float(y.pow(2).sum()) for _, y in pairs)
    return num / max(den, 1e-30)


def first_sequences(chunks: list[torch.Tensor], sequences: int) -> list[torch.Tensor]:
    """The leading chunks that hold at least ``sequences`` sequences (whole chunks)."""
    out, n = [], 0
    for c in chunks:
        if n >= sequences:
            break
        out.append(c)
        n += c.shape[0]
    return out


@dataclass
class LayerData:
    """What an algorithm sees of one layer: inputs, float outputs, statistics."""

    index: int
    x: list[torch.Tensor]
    y: list[torch.Tensor]
    stats: dict[str, ChannelStats]
    kv_amax: torch.Tensor
    ctx: Context
    device: torch.device
    xq: list[torch.Tensor] | None = None

    def release_sums(self, keep: dict[str, ChannelStats]) -> None:
        """Drop the unsmoothed ``x^T x`` sums once the final smoothing has made its scaled copies
        (``keep``), before GPTQ rounds: both would otherwise be held at GPTQ's peak (float64,
        about 0.35 GB per layer of a 1B Llama)."""
        kept = {id(st.xtx) for st in keep.values() if st.xtx is not None}
        for name, st in self.stats.items():
            if st.xtx is not None and id(st.xtx) not in kept:
                self.stats[name] = replace(st, xtx=None)

    def run(self, block: Block, inputs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        return run_block(block, self.x if inputs is None else inputs, self.ctx, self.device)

    def capture(self, block: Block, names: Iterable[str], samples: int) -> dict[str, torch.Tensor]:
        """The actual inputs [tokens, in] of the linears ``names`` on the first ``samples`` sequences."""
        names = list(names)
        parts = list(self.capture_chunks(block, names, self.subset(samples)))
        return {n: torch.cat([p[n] for p in parts]) for n in names}

    def capture_chunks(self, block: Block, names: Iterable[str], chunks: list[torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
        """Per chunk of ``chunks``, the inputs [tokens, in] of the linears ``names`` (one chunk in memory)."""
        names = list(names)
        captured: dict[str, torch.Tensor] = {}

        def hook(name):
            def store(_m, a):
                captured[name] = a[0].detach().reshape(-1, a[0].shape[-1]).float()

            return store

        handles = [block.linear(n).register_forward_pre_hook(hook(n)) for n in names]
        try:
            for chunk in chunks:
                with torch.no_grad():
                    block(chunk.to(self.device), self.ctx)
                yield dict(captured)
                captured.clear()
        finally:
            for h in handles:
                h.remove()

    def subset(self, max_samples: int, quantized: bool = False) -> list[torch.Tensor]:
        """At most ``max_samples`` sequences of the float-stream inputs (``quantized``: of the
        quantized stream, when it is propagated), for inner search loops."""
        stream = self.xq if quantized and self.xq is not None else self.x
        out, n = [], 0
        for x in stream:
            if n >= max_samples:
                break
            out.append(x[: max_samples - n])
            n += out[-1].shape[0]
        return out


@dataclass
class LayerResult:
    """An algorithm's output for one layer (the block itself is modified in place)."""

    qweights: dict = field(default_factory=dict)  # linear -> qmath.QWeight
    smoothing: dict = field(default_factory=dict)  # group name -> scale vector
    info: dict = field(default_factory=dict)  # alphas, chosen ratios, ...


class LayerAlgorithm(Protocol):
    """``needs_quant_stream``: the algorithm reads the inputs of the already quantized model (the whole
    stream is kept and propagated); ``reports_accumulated_error`` (optional): only the report wants the
    quantized stream's error against the float one, measured on the first :data:`ERROR_SEQUENCES`."""

    name: str
    needs_quant_stream: bool
    needs_hessian: bool

    def quantize_layer(self, block: Block, data: LayerData) -> LayerResult: ...


@dataclass
class LayerRecord:
    index: int
    block: Block
    result: LayerResult
    error: float  # relative MSE of the quantized layer on float inputs
    accumulated_error: float | None  # relative MSE of the quantized stream vs the float stream
    kv_amax: torch.Tensor
    seconds: float


def embed_chunks(model: Transformer, ids: torch.Tensor, batch: int,
                 device: str | torch.device | None = None) -> tuple[list[torch.Tensor], Context]:
    """Embeddings of the calibration blocks, in chunks of ``batch`` sequences, and the shared context.
    ``device``: where the chunks go, each as soon as it is embedded (the host never holds them all)."""
    chunks = []
    with torch.no_grad():
        for start in range(0, ids.shape[0], batch):
            x, _ = model.prepare(ids[start : start + batch].to(model.embed.weight.device))
            chunks.append(x.float() if device is None else x.float().to(device))
        _, ctx = model.prepare(ids[:1].to(model.embed.weight.device))  # batch-1 context broadcasts over every chunk
    return chunks, ctx


def stream_layers(
    src: TensorSource,
    ids: torch.Tensor,
    algorithm: LayerAlgorithm,
    device: str | torch.device = "cpu",
    batch: int = 8,
    progress: Progress | None = None,
) -> Iterator[LayerRecord]:
    """Quantize ``src`` layer by layer; yields each quantized layer (then drops it). The yielded block
    and its integer weights are on ``device``: a consumer takes what it keeps to the host itself."""
    device = torch.device(device)
    head = load_model(src, with_layers=False, device=device, with_head=False)  # the embeddings only
    x, ctx = embed_chunks(head, ids, batch, device)
    del head
    ctx = Context(mask=ctx.mask.to(device), cos=_to(ctx.cos, device), sin=_to(ctx.sin, device))
    reads_xq = algorithm.needs_quant_stream
    xq = list(x) if reads_xq else (first_sequences(x, ERROR_SEQUENCES)
                                   if getattr(algorithm, "reports_accumulated_error", False) else None)
    n = src.config.num_layers
    phases.lap("embed calibration set")
    for i in range(n):
        t0 = time.perf_counter()
        if progress:
            progress.update(f"layer {i + 1}/{n}: calibrating")
        block = load_block(src, i, torch.float32, device)
        phases.lap("load layer")
        with StatsCollector(block, src.config.linears, getattr(algorithm, "needs_hessian", False)) as collector:
            y = run_block(block, x, ctx, device)
        check_finite(y, f"after layer {i}")
        data = LayerData(i, x, y, collector.stats, collector.kv_amax, ctx, device, xq if reads_xq else None)
        phases.lap("calibration forward + statistics")
        phases.section(f"{algorithm.name}: smoothing, search, rounding")
        if progress:
            progress.update(f"layer {i + 1}/{n}: {algorithm.name}")
        result = algorithm.quantize_layer(block, data)
        del data  # the algorithm's view of the layer (its statistics and sums) goes before the next layer's
        phases.lap()
        error = block_error(block, x, y, ctx, device)
        if not math.isfinite(error):
            raise SqDeployError(
                f"layer {i} quantized by {algorithm.name} gives NaN/Inf outputs; its weights or activations exceed the "
                "scheme's range (check the checkpoint for extreme values)"
            )
        acc = None
        if xq is not None:
            run_block_in_place(block, xq, ctx, device)
            acc = relative_error(xq, y)
        record = LayerRecord(i, block, result, error, acc, collector.kv_amax.cpu(), time.perf_counter() - t0)
        del collector
        phases.lap("layer error + quantized stream")
        yield record
        del record, block, result
        phases.restart()
        x = y
        if progress:
            progress.advance()


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)
