"""``sq-export --target trtllm-hf``: ModelOpt's unified Hugging Face checkpoint.

TensorRT-LLM >= 1.0 serves this format with its PyTorch backend (``LLM(model=dir)``,
``trtllm-serve dir``); the engine-flow checkpoint of ``--target trtllm`` needs
``trtllm-build`` (TensorRT-LLM <= 1.2). Layout, as ModelOpt's ``export_hf_checkpoint``
writes it: HF tensor names, ``hf_quant_config.json`` (what TensorRT-LLM reads) and a
``quantization_config`` with ``quant_method: modelopt`` in config.json. Per W4A16_AWQ
linear: ``weight`` uint8 [out / 2, in] (two rows per byte, even row low),
``weight_scale`` [out, in / group] and, on the linears TensorRT-LLM loads unfused
(o_proj, down_proj: the family record's ``hf_unified.pre_quant_scale``),
``pre_quant_scale`` [in]; the q/k/v and gate/up smoothing lives in the norms.

Only float and W4A16_AWQ are written: the PyTorch backend has no W8A8 SmoothQuant
(use ``--target trtllm``) and its weight-only INT8 is not offered here.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from sqdeploy import __version__
from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.families import Family
from sqdeploy.core.report import markdown_table
from sqdeploy.formats.opened import OpenedModel, OpenedReader
from sqdeploy.formats.trtllm.config import QuantSpec, check_split, quant_spec_for
from sqdeploy.formats.trtllm.linear import RankLinear, decode
from sqdeploy.formats.trtllm.modules import TrtLinear
from sqdeploy.formats.trtllm.options import TrtllmHfOptions
from sqdeploy.formats.trtllm.pack import pack_int4_rows
from sqdeploy.formats.trtllm.source import LinearSource
from sqdeploy.model.checkpoint import stored_name
from sqdeploy.quantize.qmodel import QuantizedModel

QUANT_CONFIG = "hf_quant_config.json"


def resolve(qm_or_parts, options: TrtllmHfOptions = TrtllmHfOptions()) -> QuantSpec:
    if isinstance(qm_or_parts, QuantizedModel):
        scheme, cfg, family = qm_or_parts.scheme, qm_or_parts.config, qm_or_parts.family
    else:
        recipe, cfg, family = qm_or_parts
        scheme = recipe.scheme
    if family.trtllm is None or family.trtllm.hf_unified_pre_quant_scale is None:
        raise SqDeployError(f"--target trtllm-hf: TensorRT-LLM's PyTorch backend has no {family.name} model; use --target trtllm")
    if scheme.act.quantized:
        raise SqDeployError(
            "--target trtllm-hf: TensorRT-LLM's PyTorch backend has no W8A8 SmoothQuant (INT8 activations); "
            "use --target trtllm (trtllm-build, TensorRT-LLM <= 1.2) or a w4a16 recipe"
        )
    quant = quant_spec_for(scheme)
    if quant.algo not in (None, "W4A16_AWQ"):
        raise SqDeployError(f"--target trtllm-hf writes float or W4A16_AWQ; {quant.algo} is not offered (use --target trtllm)")
    check_split(family, cfg, quant, 1)
    return quant


def hf_quant_config(family: Family, quant: QuantSpec) -> dict:
    q = {"quant_algo": quant.algo, "kv_cache_quant_algo": None}
    if quant.groupwise:
        q.update(group_size=quant.group_size, has_zero_point=False, pre_quant_scale=True)
    # the modules left in float, named as ModelOpt names them (HF module paths)
    q["exclude_modules"] = [family.hf_name(n).rsplit(".", 1)[0] for n in ("lm_head.weight", "embed.weight")]
    return {"producer": {"name": "sq-deploy", "version": __version__}, "quantization": q}


def config_quantization(hq: dict) -> dict:
    """config.json's quantization_config, as ModelOpt's convert_hf_quant_config_format writes it for W4A16_AWQ."""
    q = hq["quantization"]
    return {"ignore": q["exclude_modules"], "quant_algo": q["quant_algo"], "producer": hq["producer"], "quant_method": "modelopt"}


def linear_tensors(family: Family, name: str, lin: RankLinear, quant: QuantSpec, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Suffix -> tensor of one HF linear."""
    out: dict[str, torch.Tensor] = {}
    if quant.algo is None:
        out["weight"] = lin.dequantized().to(dtype)
    else:
        out["weight"] = pack_int4_rows(lin.q).view(torch.uint8)
        out["weight_scale"] = lin.scale.float()  # float32 as ModelOpt writes it; TensorRT-LLM casts on load
        if name in family.trtllm.hf_unified_pre_quant_scale:
            pqs = torch.ones(lin.in_features) if lin.pre_quant_scale is None else lin.pre_quant_scale
            out["pre_quant_scale"] = pqs.to(dtype)
    if lin.bias is not None:
        out["bias"] = lin.bias.to(dtype)
    return out


def write(qdir: Path, out: Path, options: TrtllmHfOptions = TrtllmHfOptions(), progress: bool = True,
          shown_as: Path | None = None, device: str = "cpu") -> dict:
    qm = QuantizedModel(qdir)
    quant = resolve(qm, options)
    cfg, family, dtype = qm.config, qm.family, qm.dtype
    source = LinearSource(qm, quant, progress, device=device)
    tensors: dict[str, torch.Tensor] = {}
    for canonical in cfg.global_names:
        tensors[family.hf_name(canonical)] = qm.get(canonical, dtype).contiguous()
    for i in range(cfg.num_layers):
        for norm in ("attn_norm", "mlp_norm"):
            for p in ("weight", "bias") if cfg.norm_has_bias else ("weight",):
                tensors[family.hf_name(f"layers.{i}.{norm}.{p}")] = qm.get(f"layers.{i}.{norm}.{p}", dtype)
        for name, lin in source.layer(i).items():
            prefix = family.hf_name(f"layers.{i}.{name}.weight")[: -len(".weight")]
            for suffix, t in linear_tensors(family, name, lin, quant, dtype).items():
                tensors[f"{prefix}.{suffix}"] = t.contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {k: v for k, v in qm.hf_config.items() if k != "quantization_config"}
    if quant.algo is not None:
        hq = hf_quant_config(family, quant)
        (out / QUANT_CONFIG).write_text(json.dumps(hq, indent=4) + "\n")
        config["quantization_config"] = config_quantization(hq)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in qm.tokenizer_files():
        shutil.copy(f, out / f.name)
    if quant.algo is None:  # what we wrote must read back
        from sqdeploy.model.checkpoint import HFCheckpoint

        HFCheckpoint(out)
    else:
        HfUnifiedCheckpoint(out)
    rows = [["recipe", qm.recipe.name], ["quant_algo", str(quant.algo)], ["tensors", len(tensors)]]
    if source.requant_from:
        rows.append(["weights", f"symmetric INT4 ({source.rounding} rounding) from the {source.requant_from}"])
    notes = "".join(f"\nnote: {n}" for n in source.notes)
    shown = shown_as or out
    summary = f"\nTensorRT-LLM unified HF checkpoint {shown}\n{markdown_table(['field', 'value'], rows)}{notes}"
    return {"target": "trtllm-hf", "out": str(shown), "quant_algo": quant.algo, "requantized_from": source.requant_from,
            "notes": source.notes, "summary": summary}


class HfUnifiedCheckpoint:
    """A W4A16_AWQ unified HF checkpoint read back as a tensor source (dequantized weights, pre-quant scales)."""

    def __init__(self, path: str | Path):
        from sqdeploy.core.families import family_for_hf_config
        from sqdeploy.formats.trtllm.config import parse_quant
        from sqdeploy.model.checkpoint import SafetensorsFiles, read_json

        self.path = Path(path)
        hq = read_json(self.path / QUANT_CONFIG, "unified HF checkpoint")
        self.quant = parse_quant(hq.get("quantization", {}))
        if self.quant.algo != "W4A16_AWQ" or self.quant.has_zero_point:
            raise SqDeployError(f"{self.path}: quant_algo {self.quant.algo} is not one sq-deploy reads here (W4A16_AWQ)")
        hf = read_json(self.path / "config.json", "model config")
        self.family = family_for_hf_config(hf)
        self.config = self.family.config_from_hf(hf)
        self.files = SafetensorsFiles(self.path, what="unified HF checkpoint")
        self.dtype = self.files.read(self.family.hf_name("embed.weight")).dtype
        self._layer: tuple[int, dict[str, RankLinear]] | None = None
        for i in range(self.config.num_layers):  # validate every linear up front
            self.layer(i)

    def _decode(self, i: int, name: str) -> RankLinear:
        prefix = self.family.hf_name(f"layers.{i}.{name}.weight")[: -len(".weight")]
        t = {s: self.files.read(f"{prefix}.{s}") for s in ("weight", "weight_scale", "pre_quant_scale", "bias") if f"{prefix}.{s}" in self.files}
        if "weight" not in t or t["weight"].dtype != torch.uint8 or "weight_scale" not in t:
            raise SqDeployError(f"{self.path}: {prefix} is not a packed W4A16_AWQ linear (uint8 weight + weight_scale)")
        enc = {"weight": t["weight"].view(torch.int8), "weights_scaling_factor": t["weight_scale"]}
        if "pre_quant_scale" in t:
            enc["prequant_scaling_factor"] = t["pre_quant_scale"]
        if "bias" in t:
            enc["bias"] = t["bias"]
        lin = decode(enc, self.quant, "column", self.dtype)
        out_f, in_f = self.config.linear_shape(name)
        if tuple(lin.q.shape) != (out_f, in_f) or tuple(lin.scale.shape) != (out_f, in_f // self.quant.group_size):
            raise SqDeployError(f"{self.path}: {prefix} has shape {tuple(lin.q.shape)}, expected {(out_f, in_f)}")
        return replace(lin, weight=lin.dequantized())

    def layer(self, i: int) -> dict[str, RankLinear]:
        if self._layer is None or self._layer[0] != i:
            self._layer = (i, {n: self._decode(i, n) for n in self.config.linears})
        return self._layer[1]

    def _is_linear(self, canonical: str) -> bool:
        parts = canonical.split(".")
        return len(parts) == 4 and parts[0] == "layers" and parts[2] in self.config.linears

    def has(self, canonical: str) -> bool:
        if self._is_linear(canonical):
            return True
        try:
            return self.family.hf_name(canonical) in self.files
        except KeyError:
            return False

    def get(self, canonical: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self._is_linear(canonical):
            _, i, name, what = canonical.split(".")
            lin = self.layer(int(i))[name]
            return (lin.weight if what == "weight" else lin.bias).to(dtype)
        return self.files.read(self.family.hf_name(stored_name(self, canonical))).to(dtype)

    def configure_block(self, block) -> None:

        for name, lin in self.layer(block.index).items():
            pqs = lin.pre_quant_scale
            if pqs is not None and not bool((pqs == 1).all()):
                parent = block.attn if name in ("q", "k", "v", "o") else block.mlp
                setattr(parent, name, TrtLinear(block.linear(name), pqs))


def is_hf_unified_dir(path: Path) -> bool:
    return (path / QUANT_CONFIG).exists() and (path / "config.json").exists()


def open_hf_unified(path: Path, device: str):
    from sqdeploy.evaluate.perplexity import model_logits_fn
    from sqdeploy.model.loading import load_model

    ck = HfUnifiedCheckpoint(path)
    model = load_model(ck, torch.float32, device)
    return OpenedModel("trtllm-hf", path, model_logits_fn(model), path, f"unified HF checkpoint, {ck.quant.algo}", model)


READER = OpenedReader("trtllm-hf", is_hf_unified_dir, open_hf_unified)
