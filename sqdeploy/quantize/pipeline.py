"""The export pipeline: model + recipe + calibration -> QuantizedModel (on disk or in memory).

This is the short Python API behind ``sq-export`` and ``sq-eval``::

    from sqdeploy.quantize.pipeline import quantize_to_dir, Calibration
    quantize_to_dir("models/llama", "w4a16-sqplus", "out/llama-w4", Calibration("humaneval"))
"""

from __future__ import annotations

import hashlib
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from sqdeploy import __version__
from sqdeploy.core import phases
from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.families import Family, ModelConfig
from sqdeploy.core.output import atomic_output_dir
from sqdeploy.core.progress import Progress
from sqdeploy.model.checkpoint import HFCheckpoint
from sqdeploy.model.loading import load_model
from sqdeploy.model.tokenizer import check_tokenizer_fits, load_tokenizer  # noqa: F401 - part of this module's API
from sqdeploy.model.transformer import Block, Transformer
from sqdeploy.quantize import preflight, registry
from sqdeploy.quantize.algorithm import SearchInputs
from sqdeploy.quantize.calibration import CalibrationSet, build_calibration
from sqdeploy.quantize.qmodel import DTYPES, QuantizedModelWriter, round_block_floats
from sqdeploy.quantize.recipes import Recipe, load_recipe
from sqdeploy.quantize.requant import keep_source as keep_source_copy
from sqdeploy.quantize.requant import needs_kept_source
from sqdeploy.quantize.smoothing import usable_groups
from sqdeploy.quantize.streaming import LayerRecord, stream_layers


@dataclass(frozen=True)
class Calibration:
    """Calibration options; ``None`` fields take the recipe's defaults."""

    source: str | None = None
    samples: int | None = None
    seq_len: int | None = None

    def resolve(self, recipe: Recipe) -> dict[str, Any]:
        c = recipe.calibration
        return {
            "source": self.source or c["source"],
            "samples": c["samples"] if self.samples is None else self.samples,
            "seq_len": c["seq_len"] if self.seq_len is None else self.seq_len,
        }


@dataclass(frozen=True)
class Runtime:
    device: str = "cpu"
    batch: int = 8
    progress: bool = True


@dataclass
class QuantizeResult:
    recipe: Recipe
    config: ModelConfig
    family: Family
    layers: list[LayerRecord]
    calibration: dict | None
    search: dict | None
    seconds: float
    manifest: dict = field(default_factory=dict)
    calibration_ids: torch.Tensor | None = field(default=None, repr=False)


def validate_recipe(recipe: Recipe, cfg: ModelConfig, family: Family) -> None:
    """Refuse a recipe that cannot apply to this model before any work starts."""
    ws = recipe.scheme.weight
    if ws is not None:
        for name in cfg.linears:
            out_f, in_f = cfg.linear_shape(name)
            ws.check_shape(name, out_f, in_f)
    if recipe.smoothing_groups not in (None, "norms"):
        known = {g.name for g in family.smoothing_groups}
        unknown = set(recipe.smoothing_groups) - known
        if unknown:
            raise SqDeployError(f"recipe smoothing_groups: unknown {sorted(unknown)}; {family.name} has {sorted(known)}")


def smoothing_groups(recipe: Recipe, family: Family, cfg: ModelConfig):
    groups = usable_groups(family.smoothing_groups, cfg)
    if recipe.smoothing_groups == "norms":  # family-independent: every norm -> linear group
        return tuple(g for g in groups if g.kind == "norm")
    if recipe.smoothing_groups is not None:
        groups = tuple(g for g in groups if g.name in recipe.smoothing_groups)
    return groups


def storage_dtype(recipe: Recipe, cfg: ModelConfig) -> torch.dtype:
    if recipe.dtype != "auto":
        return DTYPES[recipe.dtype]
    return DTYPES.get(cfg.dtype, torch.float16) if cfg.dtype != "float32" else torch.float32


def calibration_set(ck: HFCheckpoint, recipe: Recipe, calib: Calibration) -> CalibrationSet:
    c = calib.resolve(recipe)
    if c["seq_len"] > ck.config.max_positions:
        raise SqDeployError(f"--calib-seq-len {c['seq_len']} is longer than the model's {ck.config.max_positions} positions; "
                            f"use at most {ck.config.max_positions}")
    tokenizer = load_tokenizer(ck.path)
    check_tokenizer_fits(tokenizer, ck.config.vocab_size, ck.path)
    return build_calibration(tokenizer, c["source"], c["samples"], c["seq_len"])


def quantize(
    model: str | Path | HFCheckpoint,
    recipe: str | Path | Recipe,
    calib: Calibration = Calibration(),
    runtime: Runtime = Runtime(),
    on_layer: Callable[[LayerRecord], None] | None = None,
) -> QuantizeResult:
    """Run the recipe layer by layer; ``on_layer`` receives each quantized layer (then it is freed)."""
    t0 = time.perf_counter()
    phases.lap("start (imports, checks)")
    ck = model if isinstance(model, HFCheckpoint) else HFCheckpoint(model)
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    cfg, family = ck.config, ck.family
    validate_recipe(recipe, cfg, family)
    dtype = storage_dtype(recipe, cfg)
    handler = registry.get(recipe.algorithm)
    cal = calibration_set(ck, recipe, calib) if handler.quantizes else None
    phases.lap("open model, tokenize calibration set")
    groups = smoothing_groups(recipe, family, cfg)
    search = None
    if handler.model_search is not None and cal is not None:
        phases.section("alpha search (whole model)")
        found = handler.model_search(recipe.config, SearchInputs(ck, cal.ids, recipe.scheme, groups, runtime.device,
                                                                 runtime.batch, runtime.progress))
        if found is not None:  # the resolved recipe states what the search chose
            config, search = found
            recipe = replace(recipe, config=config)
        phases.lap()
    algorithm = handler.build(recipe.config, recipe.scheme, cfg, groups)
    ids = cal.ids if cal is not None else torch.zeros(1, 2, dtype=torch.long)
    layers = []
    with Progress(cfg.num_layers, f"quantizing ({recipe.name})", runtime.progress) as bar:
        for record in stream_layers(ck, ids, algorithm, runtime.device, runtime.batch, bar):
            round_block_floats(record.block, cfg, dtype, quantized=not recipe.scheme.is_float)
            if on_layer is not None:
                on_layer(record)
            phases.lap("write quantized model")
            layers.append(record)
            # free the layer (only the manifest's numbers stay): memory stays near one layer
            record.block, record.result.qweights, record.result.smoothing = None, {}, {}
            _return_freed_memory()
            phases.lap("free layer")
    result = QuantizeResult(recipe, cfg, family, layers, cal.describe() if cal else None, search, time.perf_counter() - t0,
                            calibration_ids=cal.ids if cal is not None else None)
    result.manifest = build_manifest(ck, result, dtype)
    return result


def _return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise), so that a
    layer-sized peak does not ratchet up layer after layer."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def build_manifest(ck: HFCheckpoint, result: QuantizeResult, dtype: torch.dtype) -> dict[str, Any]:
    config_sha = hashlib.sha256((ck.path / "config.json").read_bytes()).hexdigest()
    return {
        "producer": {"name": "sq-deploy", "version": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "source_model": {"path": str(ck.path.resolve()), "architecture": ck.config.architecture, "config_sha256": config_sha},
        "family": result.family.name,
        "dtype": str(dtype).replace("torch.", ""),
        "recipe": result.recipe.to_dict(),
        "calibration": result.calibration,
        "alpha_search": _search_summary(result.search),
        "layers": [
            {
                "index": r.index,
                "error": r.error,
                "accumulated_error": r.accumulated_error,
                "kv_amax": [float(v) for v in r.kv_amax],
                "info": _plain(r.result.info),
                "seconds": round(r.seconds, 3),
            }
            for r in result.layers
        ],
        "seconds": round(result.seconds, 2),
    }


def _search_summary(search: dict | None) -> dict | None:
    if search is None:
        return None
    drop = lambda d: {k: v for k, v in d.items() if k != "per_layer_error"}  # noqa: E731 - too long for a manifest
    return {k: _plain(drop(v) if isinstance(v, dict) and "per_layer_error" in v else v)
            for k, v in search.items() if k != "per_layer_error"}


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, torch.Tensor):
        return v.tolist()
    return v


def global_tensors(ck: HFCheckpoint, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {n: ck.get(n, dtype) for n in ck.config.global_names}


def check_resources(ck: HFCheckpoint, recipe: Recipe, out: str | Path, calib: Calibration = Calibration(),
                    runtime: Runtime = Runtime(), target_copies: float = 0.0) -> None:
    """Before calibration, refuse an export that cannot finish: too little free disk under ``out``
    for the quantized model (plus ``target_copies`` times its size for an export target), or a
    GPU too small for one layer and its calibration activations (:mod:`.preflight`)."""
    dtype = storage_dtype(recipe, ck.config)
    preflight.check_disk(out, preflight.output_bytes(ck.config, recipe.scheme, dtype, target_copies))
    if recipe.algorithm != "none":
        c = calib.resolve(recipe)
        preflight.check_gpu(runtime.device, ck.config, runtime.batch, c["seq_len"], recipe.params.get("rounding") == "gptq",
                            c["samples"])


def quantize_to_dir(
    model: str | Path,
    recipe: str | Path | Recipe,
    out: str | Path,
    calib: Calibration = Calibration(),
    runtime: Runtime = Runtime(),
    force: bool = False,
    keep_source: bool = False,
) -> tuple[Path, QuantizeResult]:
    """Quantize and write a QuantizedModel directory atomically.

    ``keep_source``: for schemes a TensorRT-LLM export re-quantizes (:func:`.requant.needs_kept_source`),
    also keep a copy of the source weights and the calibration blocks, so that the directory alone
    suffices for that export. Off by default: the copy is as large as the source model."""
    ck = HFCheckpoint(model)
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    validate_recipe(recipe, ck.config, ck.family)
    dtype = storage_dtype(recipe, ck.config)
    check_resources(ck, recipe, out, calib, runtime)
    with atomic_output_dir(out, force, inputs=[ck.path, calib.source]) as tmp:
        writer = QuantizedModelWriter(tmp, ck.family, ck.config, recipe.scheme, dtype)
        result = quantize(ck, recipe, calib, runtime, lambda r: writer.add_layer(r.block, r.result.qweights, r.result.smoothing))
        writer.add_globals(global_tensors(ck, dtype))
        writer.finish(ck.hf_config, result.manifest, ck.tokenizer_files())
        phases.lap("write quantized model")
        if keep_source and needs_kept_source(recipe.scheme):
            keep_source_copy(ck, result.calibration_ids, tmp)
    return Path(out), result


def quantize_in_memory(
    model: str | Path | HFCheckpoint,
    recipe: str | Path | Recipe,
    calib: Calibration = Calibration(),
    runtime: Runtime = Runtime(),
) -> tuple[Transformer, QuantizeResult]:
    """The fake-quantized reference model (float32), for evaluation without writing files."""
    ck = model if isinstance(model, HFCheckpoint) else HFCheckpoint(model)
    blocks: list[Block] = []
    result = quantize(ck, recipe, calib, runtime, lambda r: blocks.append(r.block.to("cpu")))
    dtype = storage_dtype(result.recipe, ck.config)
    full = load_model(_RoundedGlobals(ck, dtype), with_layers=False)
    full.layers.extend(blocks)
    return full.eval(), result


class _RoundedGlobals:
    """Globals rounded through the storage dtype, exactly as the directory stores them."""

    def __init__(self, ck: HFCheckpoint, dtype: torch.dtype):
        self.ck, self.dtype, self.config = ck, dtype, ck.config

    def has(self, name: str) -> bool:
        return self.ck.has(name)

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.ck.get(name, self.dtype).to(dtype)
