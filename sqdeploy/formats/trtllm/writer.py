"""``sq-export --target trtllm``: a QuantizedModel -> a TensorRT-LLM checkpoint (config.json + rank{r}.safetensors).

Layer by layer, each canonical linear is taken in TensorRT-LLM's semantics
(:mod:`.source`), split for every rank (:mod:`.shard`), fused into TensorRT-LLM's
modules and encoded into that algorithm's tensors (:mod:`.linear`); the names come
from the family record. Before the directory is released the checker runs on it, so
a checkpoint that sq-deploy writes is one ``sq-check trtllm`` accepts.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from sqdeploy.core import phases
from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.progress import Progress
from sqdeploy.core.report import markdown_table
from sqdeploy.formats.trtllm.config import CheckpointSpec, QuantSpec, build_config, check_split, parse_config, quant_spec_for
from sqdeploy.formats.trtllm.linear import DTYPES, encode
from sqdeploy.formats.trtllm.names import LAYER, global_rows
from sqdeploy.formats.trtllm.options import TrtllmOptions
from sqdeploy.formats.trtllm.shard import fuse, pad_mlp, shard
from sqdeploy.formats.trtllm.source import LinearSource
from sqdeploy.formats.trtllm.stream import RankFiles
from sqdeploy.quantize.qmodel import QuantizedModel


def resolve(qm_or_parts, options: TrtllmOptions) -> QuantSpec:
    """The checkpoint's quantization for a QuantizedModel (or a recipe about to make one); refuses impossible requests."""
    if isinstance(qm_or_parts, QuantizedModel):
        scheme, cfg, family = qm_or_parts.scheme, qm_or_parts.config, qm_or_parts.family
        calibrated = qm_or_parts.manifest.get("calibration") is not None
    else:
        recipe, cfg, family = qm_or_parts
        scheme, calibrated = recipe.scheme, recipe.algorithm != "none"
    kv = options.kv_cache
    quant = quant_spec_for(scheme, None if kv is None else kv.upper(), bool(options.int4_zero_point))
    if not family.trtllm:
        raise SqDeployError(f"the {family.name} family has no TensorRT-LLM layout")
    check_split(family, cfg, quant, int(options.tp), int(options.pp), pad=True)
    if quant.kv and not calibrated:
        raise SqDeployError("--kv-cache int8 needs calibrated K/V ranges, and this recipe does not calibrate; use a quantizing recipe")
    return quant


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def global_tensors(qm: QuantizedModel, spec: CheckpointSpec, dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    """Embeddings, final norm and lm_head per rank (lm_head always written, tied or not)."""
    cfg, tp = spec.config, spec.tp
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for name, (canonical, split) in spec.family.trtllm.globals.items():
        t = qm.get(canonical, dtype)  # lm_head falls back to the tied embedding
        if canonical == "pos_embed.weight":
            t = t[cfg.pos_offset :]
        if split == "replicated" or (split == "embedding" and not spec.parallel_embedding):
            for r in range(tp):
                ranks[r][name] = t.contiguous()
            continue
        rows = math.ceil(global_rows(cfg, canonical) / tp)
        padded = _pad_rows(t, rows * tp)
        for r in range(tp):
            ranks[r][name] = padded[r * rows : (r + 1) * rows].clone()
    return ranks


def layer_tensors(lins: dict, spec: CheckpointSpec, i: int, qm: QuantizedModel, dtype: torch.dtype, rank: int) -> dict[str, torch.Tensor]:
    cfg, record, quant = spec.config, spec.family.trtllm, spec.quant
    prefix = LAYER.format(i=i)
    out: dict[str, torch.Tensor] = {}
    for norm, canonical in record.norms.items():
        out[f"{prefix}{norm}.weight"] = qm.get(f"layers.{i}.{canonical}.weight", dtype)
        if cfg.norm_has_bias:
            out[f"{prefix}{norm}.bias"] = qm.get(f"layers.{i}.{canonical}.bias", dtype)
        if quant.sq_plugin:
            # per-token activations: the norm plugin's static scale is unused, 1.0 by convention
            out[f"{prefix}{norm}.scale_to_int"] = torch.ones(1, dtype=dtype)
    for module, info in record.linears.items():
        fused = fuse([shard(lins[n], cfg, n, spec.tp, rank) for n in info.fuse])
        for suffix, t in encode(fused, quant, dtype).items():
            out[f"{prefix}{module}.{suffix}"] = t
    if quant.kv == "INT8":
        k_amax, v_amax = qm.kv_amax()[i]
        # TensorRT-LLM has one scale for K and V (dequant multiplier)
        out[f"{prefix}attention.kv_cache_scaling_factor"] = torch.tensor([max(k_amax, v_amax, 1e-8) / 127.0], dtype=torch.float32)
    return out


def write(qdir: Path, out: Path, options: TrtllmOptions = TrtllmOptions(), progress: bool = True,
          shown_as: Path | None = None, device: str = "cpu") -> dict:
    from sqdeploy.formats.trtllm.check import check_dir

    qm = QuantizedModel(qdir)
    quant = resolve(qm, options)
    tp = int(options.tp)
    dtype = qm.dtype
    config = build_config(qm.family, qm.config, quant, tp, _dtype_name(dtype), pad=True)
    spec = parse_config(json.loads(json.dumps(config)))  # what we write must read back
    source = LinearSource(qm, quant, progress, options.int4_requant_clip == "search", device)
    meta = {"format": "pt", "producer": "sq-deploy"}
    files = RankFiles(out, global_tensors(qm, spec, dtype), qm.config.num_layers, LAYER, meta)  # one layer in memory
    with Progress(qm.config.num_layers, f"writing TensorRT-LLM checkpoint (tp {tp})", progress) as bar:
        for i in range(qm.config.num_layers):
            lins = source.layer(i)
            if spec.unpadded_intermediate is not None:  # MLP widened to the padded intermediate_size
                lins = pad_mlp(lins, spec.config.intermediate_size)
            files.add_layer([layer_tensors(lins, spec, i, qm, dtype, r) for r in range(tp)])
            bar.advance()
    files.close()
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in qm.tokenizer_files():  # a convention only: trtllm-build reads config.json and rank files
        shutil.copy(f, out / f.name)
    phases.lap()
    result = check_dir(out)
    phases.lap("check written checkpoint")
    if not result.ok:
        raise SqDeployError(f"internal error: the written checkpoint fails its own check: {result.first_failure()}")
    return _report(qm, spec, source, out, options, shown_as)


def _report(qm: QuantizedModel, spec: CheckpointSpec, source: LinearSource, out: Path, options: TrtllmOptions,
            shown_as: Path | None) -> dict:
    quant = spec.quant
    size = sum(f.stat().st_size for f in out.glob("rank*.safetensors"))
    rows = [
        ["recipe", qm.recipe.name], ["scheme", qm.scheme.describe()], ["quant_algo", str(quant.algo)],
        ["kv_cache_quant_algo", str(quant.kv)], ["tp", spec.tp], ["rank files", f"{spec.tp} ({size / 2**20:.1f} MiB)"],
    ]
    if spec.unpadded_intermediate is not None:
        rows.append(["intermediate_size", f"{spec.unpadded_intermediate} padded to {spec.config.intermediate_size} "
                     f"(zero rows/columns: TensorRT-LLM's INT4 tile max(64, group) * tp)"])
    if quant.groupwise:
        rows += [["group_size", quant.group_size], ["has_zero_point", f"{quant.has_zero_point}" + (" (experimental)" if quant.has_zero_point else "")]]
    if source.requant_from:
        clip = ", clipping searched" if source.clipped else ""
        how = f"symmetric INT4 ({source.rounding} rounding{clip}) from the {source.requant_from}"
        rows.append(["weights", how if quant.groupwise else f"float ({source.requant_from}); trtllm-build quantizes them"])
    if quant.kv == "INT8":
        source.notes.append("INT8 KV cache: build with trtllm-build --use_paged_context_fmha disable")
    shown = shown_as or out
    report = {
        "target": "trtllm", "out": str(shown), "quant_algo": quant.algo, "kv_cache_quant_algo": quant.kv, "tp": spec.tp,
        "group_size": quant.group_size, "has_zero_point": quant.has_zero_point, "requantized_from": source.requant_from,
        "requant_rounding": source.rounding if source.requant_from else None,
        "unpadded_intermediate_size": spec.unpadded_intermediate, "requant_clip_search": source.clipped, "notes": list(source.notes), "bytes": size,
    }
    eval_text = options.eval_text
    if eval_text:
        from sqdeploy.evaluate.perplexity import format_change
        from sqdeploy.formats.trtllm.evaluate import compare_perplexity

        report["perplexity"] = compare_perplexity(qm.path, out, eval_text, int(options.eval_windows or 24))
        ppl = report["perplexity"]
        for name, value in ppl["values"].items():
            rows.append([f"perplexity: {name}", round(value, 4)])
        change = format_change(ppl["relative_difference"], ppl["relative_difference_stderr"], 3)
        rows.append(["checkpoint vs quantized model", f"{change} (paired s.e., {ppl['windows']} windows)"])
    notes = "".join(f"\nnote: {n}" for n in source.notes)
    report["summary"] = f"\nTensorRT-LLM checkpoint {shown}\n{markdown_table(['field', 'value'], rows)}{notes}"
    return report


__all__ = ["DTYPES", "resolve", "write"]
