"""Re-quantizing a quantized model into another weight grid, from what its directory keeps.

TensorRT-LLM has no producer-tested asymmetric INT4 (no NVIDIA tool writes zero
points for the checkpoint flow), and its weight-only W8A16/W4A16 layouts take float
weights that trtllm-build quantizes itself. Both want the weights *after smoothing
and before rounding*. Re-quantizing the already rounded asymmetric weights would round
twice, so a quantized directory of such a scheme keeps what re-quantization needs
(:func:`needs_kept_source`): the source model's weights (a copy, ``sqdeploy/source/``) and the calibration token blocks
(``sqdeploy/calibration.safetensors``). Each layer is rebuilt from the kept weights and
the recorded smoothing vectors are folded in exactly as the recipe folded them; the
original source model and calibration data are never opened again.

A recipe that rounds with GPTQ needs the Hessians of its (smoothed) calibration inputs:
then the kept calibration set is streamed through the pipeline's own driver once
more (:class:`RecordedSmoothing`: fold, then the recipe's rounding into the new scheme).
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from sqdeploy.core import qmath
from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.families.base import ModelConfig
from sqdeploy.core.schemes import QuantScheme, WeightScheme
from sqdeploy.model.checkpoint import HFCheckpoint
from sqdeploy.model.loading import load_block
from sqdeploy.quantize.qmodel import KEPT_CALIBRATION, KEPT_SOURCE, QuantizedModel
from sqdeploy.quantize.rtn import Rounding
from sqdeploy.quantize.smoothing import expand_to_consumer, fold
from sqdeploy.quantize.streaming import LayerResult

# a source whose smoothed weights are this far (relative L2) from the stored quantized
# ones is not the model the directory was quantized from
MAX_REL_ERROR = {4: 0.2, 8: 0.02}


class SmoothedWeights:
    """Per layer, the canonical linears' smoothed float32 weights, rebuilt from the directory's kept source weights."""

    def __init__(self, qm: QuantizedModel):
        self.qm = qm
        self.cfg: ModelConfig = qm.config
        self.smoothing = qm.smoothing()
        src = qm.path / KEPT_SOURCE
        if not (src / "config.json").exists():
            raise SqDeployError(
                f"{qm.path} does not keep the source weights that re-quantizing {qm.scheme.describe()} needs "
                "(quantize with --keep-source to keep them); re-export from the Hugging Face model: "
                "sq-export HF_MODEL --recipe RECIPE --target ..."
            )
        sha = hashlib.sha256((src / "config.json").read_bytes()).hexdigest()
        if sha != (qm.manifest.get("source_model") or {}).get("config_sha256"):
            raise SqDeployError(f"{src} is not the model {qm.path} was quantized from (config.json differs); re-export from the Hugging Face model")
        self.ck: HFCheckpoint = HFCheckpoint(src)
        self._check_layer0()

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        """Smoothed float32 weight of every canonical linear of layer ``i``."""
        block = load_block(self.ck, i, torch.float32)
        for group in self.qm.family.smoothing_groups:
            s = self.smoothing.get(f"layers.{i}.{group.name}")
            if s is not None:
                fold(block, group, s, self.cfg)
        return {n: block.linear(n).weight.detach() for n in self.cfg.linears}

    def _check_layer0(self) -> None:
        if self.qm.scheme.is_float:
            return
        ws = self.qm.scheme.weight
        weights = self.layer(0)
        for name, w in weights.items():
            deq = qmath.dequantize_weight(self.qm.qweight(0, name), ws)
            err = float((deq - w).norm() / w.norm().clamp_min(1e-12))
            if err > MAX_REL_ERROR[ws.bits]:
                raise SqDeployError(
                    f"{self.qm.path / KEPT_SOURCE}: smoothed layer 0 {name} differs from the quantized one by {err:.0%}; "
                    "it is not the model this directory was quantized from: re-export from the Hugging Face model"
                )


def symmetric_int4(w: torch.Tensor, group: int) -> qmath.QWeight:
    """Symmetric INT4, one scale per group (s = amax / 7, q in [-8, 7]), qmath's convention."""
    return qmath.quantize_weight(w, WeightScheme(4, "group", group, symmetric=True))


class RecordedSmoothing:
    """A layer algorithm for the pipeline's streaming driver: fold the smoothing vectors the
    recipe recorded, then round the way the recipe rounds (GPTQ on the smoothed inputs, or
    to nearest) into another weight scheme. Nothing is searched again."""

    name = "recorded smoothing"
    needs_quant_stream = False

    def __init__(self, qm: QuantizedModel, scheme: QuantScheme, rounding: Rounding, clip_search: bool = True):
        self.qm, self.cfg, self.scheme, self.rounding = qm, qm.config, scheme, rounding
        self.clip_search = clip_search
        self.smoothing = qm.smoothing()
        self.needs_hessian = rounding.needs_hessian

    def quantize_layer(self, block, data) -> LayerResult:
        stats = dict(data.stats)
        for group in self.qm.family.smoothing_groups:
            s = self.smoothing.get(f"layers.{block.index}.{group.name}")
            if s is None:
                continue
            fold(block, group, s, self.cfg)
            s_in = expand_to_consumer(group, s, self.cfg)
            for c in group.consumers:
                stats[c] = stats[c].scaled(s_in)
        return LayerResult(qweights=self.rounding(block, self.cfg.linears, self.scheme, data, stats, self._clip(block, data)))

    def _clip(self, block, data) -> dict[str, torch.Tensor] | None:
        """A fresh clip search for the new grid: the recipe's clipping (if any) was chosen for
        the asymmetric one, and symmetric INT4 loses most where a group's range is one-sided.
        Unlike AWQ's own search, q and k are clipped too: their groups are as one-sided as any,
        and max-abs scales waste half of the symmetric grid there (on the shared model both
        INT4 recipes read 0.04-0.06% better on the validation windows with them clipped)."""
        ws = self.scheme.weight
        if not self.clip_search or ws is None or ws.bits != 4:
            return None
        from sqdeploy.quantize.awq import ClipSearch

        return ClipSearch(skip=())(block, self.cfg.linears, ws, data)


def recorded_calibration(qm: QuantizedModel) -> torch.Tensor:
    """The calibration blocks the recipe used, as the directory keeps them (checked against their recorded sha256)."""
    from safetensors.torch import load_file

    f = qm.path / KEPT_CALIBRATION
    if not f.exists():
        raise SqDeployError(
            f"{qm.path} does not keep the calibration set that re-rounding with GPTQ needs (quantize with "
            "--keep-source to keep it); re-export from the Hugging Face model: sq-export HF_MODEL --recipe RECIPE --target ..."
        )
    ids = load_file(str(f))["ids"]
    if hashlib.sha256(ids.numpy().tobytes()).hexdigest() != (qm.manifest.get("calibration") or {}).get("sha256"):
        raise SqDeployError(f"{f} is not the calibration set the manifest records (sha256 differs); re-export from the Hugging Face model")
    return ids


def needs_kept_source(scheme: QuantScheme) -> bool:
    """Whether an export re-quantizes this scheme from its smoothed float weights: weight-only schemes
    (trtllm-build quantizes float weights itself) and asymmetric INT4 (TensorRT-LLM's INT4 is symmetric)."""
    w = scheme.weight
    return w is not None and scheme.act.kind == "none" and (w.bits == 8 or w.granularity == "channel" or not w.symmetric)


def keep_source(ck: HFCheckpoint, ids: torch.Tensor | None, out: Path) -> None:
    """Keep in a quantized directory what re-quantization needs: a copy of the source weights and the
    calibration token blocks."""
    from safetensors.torch import save_file

    dst = out / KEPT_SOURCE
    dst.mkdir(parents=True, exist_ok=True)
    names = ["config.json", *(p.name for p in sorted(ck.path.glob("*.safetensors")) if not p.name.startswith("."))]
    names += [p.name for p in ck.path.glob("*.safetensors.index.json")]
    for name in names:  # copies, not hard links: the output's modes are set afterwards and must not touch the source
        shutil.copyfile(ck.path / name, dst / name)
    if ids is not None:
        save_file({"ids": ids.contiguous()}, str(out / KEPT_CALIBRATION))


def requantize_streamed(
    qm: QuantizedModel, ck: HFCheckpoint, ids: torch.Tensor, scheme: QuantScheme, progress: bool, clip_search: bool = True,
    device: str | torch.device = "cpu", batch: int = 8,
) -> Iterator[dict[str, qmath.QWeight]]:
    """Per layer (in order), the weights re-quantized into ``scheme`` with the recipe's own rounding
    (computed on ``device``, as the recipe's own pass; handed over on the host)."""
    from sqdeploy.core.progress import Progress
    from sqdeploy.quantize.streaming import stream_layers

    rounding = Rounding.of(qm.recipe.config)  # parsed: keys missing in older directories took their defaults
    algorithm = RecordedSmoothing(qm, scheme, rounding, clip_search)
    with Progress(qm.config.num_layers, f"re-quantizing ({rounding.method} rounding)", progress) as bar:
        for record in stream_layers(ck, ids, algorithm, device, batch, bar):
            yield {n: qweight_on_host(qw) for n, qw in record.result.qweights.items()}


def qweight_on_host(qw: qmath.QWeight) -> qmath.QWeight:
    return qmath.QWeight(qw.q.cpu(), qw.scale.cpu(), None if qw.zero is None else qw.zero.cpu())
