"""QuantizedModel: the hub between the algorithms and the export targets.

On disk it is a Hugging Face model directory in the **compressed-tensors** format
(what vLLM and transformers load for llm-compressor models), plus a manifest:

``config.json``
    the source config with ``quantization_config`` (``quant_method: compressed-tensors``).
``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``
    HF tensor names. Per quantized linear ``P``:

    ========================= ============================================================
    INT8 weights              ``P.weight`` int8 [out, in], ``P.weight_scale`` f32 [out, 1]
                              (per channel) or [1] (per tensor)
    INT4 weights              ``P.weight_packed`` int32 [out, in/8] (8 signed nibbles per
                              word, first in the low bits), ``P.weight_scale`` f32
                              [out, in/group], ``P.weight_shape`` int64 [2] and, when
                              asymmetric, ``P.weight_zero_point`` int32 [out/8, in/group]
                              (packed along the output dim)
    static activations        ``P.input_scale`` f32 [1]
    ========================= ============================================================

    Signed storage as compressed-tensors defines it: an asymmetric value ``q`` in
    [0, 15] is stored as ``q - 8``, its zero point likewise. Norms and linears carry
    the folded smoothing; embeddings, norms and biases keep the float dtype.
``sqdeploy.json``
    the manifest: format version, family, the resolved recipe, the per-layer record
    (chosen alphas, errors), the calibration set (source, sizes, sha256), KV-cache
    abs-max per layer and the source model, so every target can be produced from
    this directory without recalibrating.
``sqdeploy/smoothing.safetensors``
    the smoothing vector of every group, for targets that must re-quantize the
    smoothed float weights (e.g. TensorRT-LLM's symmetric INT4 from an asymmetric
    scheme). In a subfolder, so loaders that glob ``*.safetensors`` beside the
    weights never take it for a weight shard; directories written before it moved
    keep it at the top level, where :meth:`QuantizedModel.smoothing` still reads it.
``sqdeploy/source/`` and ``sqdeploy/calibration.safetensors``
    only for schemes a target re-quantizes (weight-only, asymmetric INT4; see
    :mod:`sqdeploy.quantize.requant`): a copy of the source model's config and weights
    and the calibration token blocks, so that re-quantization
    never reopens the source model or the calibration data.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sqdeploy.core import qmath
from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.families import Family, ModelConfig, family_for_hf_config
from sqdeploy.core.schemes import QuantScheme
from sqdeploy.model.checkpoint import SafetensorsFiles, read_json, stored_name
from sqdeploy.model.loading import quantize_activations
from sqdeploy.model.transformer import Block
from sqdeploy.quantize.recipes import Recipe, parse_recipe

FORMAT = "sqdeploy.quantized"
FORMAT_VERSION = 1
MANIFEST = "sqdeploy.json"
SMOOTHING = "sqdeploy/smoothing.safetensors"
OLD_SMOOTHING = "smoothing.safetensors"  # where directories of format 1 written before the move keep it
KEPT_SOURCE = "sqdeploy/source"  # what re-quantization needs (sqdeploy.quantize.requant)
KEPT_CALIBRATION = "sqdeploy/calibration.safetensors"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _scale_shape(qw: qmath.QWeight, scheme: QuantScheme) -> torch.Tensor:
    if scheme.weight.granularity == "tensor":
        return qw.scale.reshape(1)
    return qw.scale.reshape(qw.q.shape[0], -1)


def encode_linear(prefix: str, qw: qmath.QWeight, scheme: QuantScheme, input_scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """compressed-tensors tensors of one quantized linear (without its bias)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    ws = scheme.weight
    out: dict[str, torch.Tensor] = {f"{prefix}.weight_scale": _scale_shape(qw, scheme).float().contiguous()}
    if ws.bits == 8:
        out[f"{prefix}.weight"] = qw.q.contiguous()
    else:
        offset = 0 if ws.symmetric else 8
        out[f"{prefix}.weight_packed"] = pack_to_int32((qw.q.to(torch.int16) - offset).to(torch.int8), 4)
        out[f"{prefix}.weight_shape"] = torch.tensor(list(qw.q.shape), dtype=torch.int64)
        if qw.zero is not None:
            zp = (qw.zero.to(torch.int16) - offset).to(torch.int8)
            out[f"{prefix}.weight_zero_point"] = pack_to_int32(zp, 4, packed_dim=0)
    if input_scale is not None:
        out[f"{prefix}.input_scale"] = input_scale.float().reshape(1)
    return out


def decode_linear(files: SafetensorsFiles, prefix: str, scheme: QuantScheme) -> qmath.QWeight:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    ws = scheme.weight
    scale = files.read(f"{prefix}.weight_scale").float()
    if ws.bits == 8:
        q = files.read(f"{prefix}.weight")
        if q.dtype != torch.int8:
            raise SqDeployError(f"{files.path}: {prefix}.weight should be int8, is {q.dtype}")
        scale = scale.reshape(1, 1) if ws.granularity == "tensor" else scale.reshape(q.shape[0], -1)
        return qmath.QWeight(q=q, scale=scale)
    shape = torch.Size(files.read(f"{prefix}.weight_shape").tolist())
    offset = 0 if ws.symmetric else 8
    q = (unpack_from_int32(files.read(f"{prefix}.weight_packed"), 4, shape).to(torch.int16) + offset).to(torch.int8)
    zero = None
    if not ws.symmetric:
        packed = files.read(f"{prefix}.weight_zero_point")
        zshape = torch.Size([shape[0], scale.shape[-1]])
        zero = (unpack_from_int32(packed, 4, zshape, packed_dim=0).to(torch.int16) + offset).to(torch.int8)
    return qmath.QWeight(q=q, scale=scale.reshape(shape[0], -1), zero=zero)


def ct_quantization_config(scheme: QuantScheme, ignore: list[str]) -> dict[str, Any]:
    """``quantization_config`` in compressed-tensors' schema, validated by its own classes."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    ws = scheme.weight
    weights = QuantizationArgs(
        num_bits=ws.bits, type="int", symmetric=ws.symmetric, strategy=ws.granularity,
        group_size=ws.group_size, dynamic=False,
    )
    acts = None
    if scheme.act.quantized:
        acts = QuantizationArgs(
            num_bits=8, type="int", symmetric=True,
            strategy="token" if scheme.act.kind == "dynamic_token" else "tensor",
            dynamic=not scheme.act.static,
        )
    fmt = "int-quantized" if ws.bits == 8 else "pack-quantized"
    group = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts, format=fmt)
    cfg = QuantizationConfig(config_groups={"group_0": group}, ignore=ignore, quantization_status="compressed", format=fmt)
    out = cfg.model_dump(mode="json")
    if fmt == "pack-quantized" and not ws.symmetric:
        # transformers' own key (CompressedTensorsConfig.dequantize; vLLM ignores it): load asymmetric
        # pack-quantized weights dequantized. Without it compressed-tensors (0.20) declares the packed
        # zero point with its unpacked shape [out, groups] on the meta model, and transformers refuses
        # the stored [out/8, groups] one as a size mismatch. The stored integers are the same either way.
        out["dequantize"] = True
    return out


def layer_float_tensors(block: Block, cfg: ModelConfig, quantized: bool) -> dict[str, torch.Tensor]:
    """Canonical float tensors of a block: norms, biases, and the weights of unquantized linears."""
    i = block.index
    out = {}
    for norm in ("attn_norm", "mlp_norm"):
        mod = block.module(norm)
        out[f"layers.{i}.{norm}.weight"] = mod.weight.detach()
        if mod.bias is not None:
            out[f"layers.{i}.{norm}.bias"] = mod.bias.detach()
    for name in cfg.linears:
        lin = block.linear(name)
        if not quantized:
            out[f"layers.{i}.{name}.weight"] = lin.weight.detach()
        if lin.bias is not None:
            out[f"layers.{i}.{name}.bias"] = lin.bias.detach()
    return out


def round_block_floats(block: Block, cfg: ModelConfig, dtype: torch.dtype, quantized: bool) -> None:
    """Round the float tensors to the storage dtype, so the in-memory model equals the saved one."""
    with torch.no_grad():
        for t in layer_float_tensors(block, cfg, quantized).values():
            t.copy_(t.to(dtype).to(t.dtype))


class QuantizedModelWriter:
    """Writes a QuantizedModel directory incrementally (one layer at a time) into ``out``.

    Layers wait in memory only until a shard fills (256 MiB), so the export's peak memory
    stays near one decoder layer plus one shard whatever the model's size.
    """

    def __init__(self, out: Path, family: Family, cfg: ModelConfig, scheme: QuantScheme, dtype: torch.dtype, shard_bytes: int = 256 << 20):
        self.out, self.family, self.cfg, self.scheme, self.dtype = Path(out), family, cfg, scheme, dtype
        self.shard_bytes = shard_bytes
        self.out.mkdir(parents=True, exist_ok=True)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._smoothing: dict[str, torch.Tensor] = {}

    def _add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            self._pending[name] = t.detach().cpu().contiguous()
            self._pending_bytes += t.numel() * t.element_size()
        if self._pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        path = self.out / f".shard-{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def _hf(self, canonical: str) -> str:
        return self.family.hf_name(canonical)

    def add_layer(self, block: Block, qweights: dict[str, qmath.QWeight], smoothing: dict[str, torch.Tensor]) -> None:
        quantized = not self.scheme.is_float
        floats = layer_float_tensors(block, self.cfg, quantized)
        tensors = {self._hf(k): v.to(self.dtype) for k, v in floats.items()}
        for name, qw in qweights.items():
            prefix = self._hf(f"layers.{block.index}.{name}.weight")[: -len(".weight")]
            lin = block.linear(name)
            tensors.update(encode_linear(prefix, qw, self.scheme, lin.input_scale if self.scheme.act.static else None))
        self._add(tensors)
        for group, s in smoothing.items():
            self._smoothing[f"layers.{block.index}.{group}"] = s.float().cpu()

    def add_globals(self, tensors: dict[str, torch.Tensor]) -> None:
        """Canonical global tensors (embed, pos_embed, final_norm, lm_head)."""
        self._add({self._hf(k): v.to(self.dtype) for k, v in tensors.items()})

    def finish(self, hf_config: dict[str, Any], manifest: dict[str, Any], tokenizer_files: list[Path]) -> None:
        self._flush()
        n = len(self._shards)
        weight_map, total = {}, 0
        for k, (tmp, names) in enumerate(self._shards):
            final = self.out / (f"model-{k + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors")
            os.replace(tmp, final)
            total += final.stat().st_size
            weight_map.update({name: final.name for name in names})
        # always indexed: readers never have to guess which files are weight shards
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if self._smoothing:
            (self.out / SMOOTHING).parent.mkdir(exist_ok=True)
            save_file(self._smoothing, str(self.out / SMOOTHING))
        config = dict(hf_config)
        config["dtype"] = str(self.dtype).replace("torch.", "")
        config.pop("torch_dtype", None)
        if not self.scheme.is_float:
            config["quantization_config"] = ct_quantization_config(self.scheme, ignore=["lm_head"])
        else:
            config.pop("quantization_config", None)
        (self.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for f in tokenizer_files:
            shutil.copy(f, self.out / f.name)
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}
        (self.out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_jsonable) + "\n")


def _jsonable(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def is_quantized_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).exists()


class QuantizedModel:
    """A QuantizedModel directory opened lazily; a tensor source for the reference model."""

    def __init__(self, path: str | Path):
        from sqdeploy.core.integrity import verify_recorded_files

        self.path = Path(path)
        verify_recorded_files(self.path)
        self.manifest = read_json(self.path / MANIFEST, "quantized model manifest")
        if self.manifest.get("format") != FORMAT:
            raise SqDeployError(f"{self.path / MANIFEST} is not a sq-deploy quantized model manifest")
        if self.manifest.get("format_version", 0) > FORMAT_VERSION:
            raise SqDeployError(f"{self.path} was written by a newer sq-deploy (format {self.manifest['format_version']}); upgrade sq-deploy")
        self.hf_config = read_json(self.path / "config.json", "model config")
        self.family: Family = family_for_hf_config(self.hf_config)
        self.config: ModelConfig = self.family.config_from_hf(self.hf_config)
        self.recipe: Recipe = parse_recipe(self.manifest["recipe"], origin=self.manifest["recipe"].get("name", "recipe"))
        self.scheme: QuantScheme = self.recipe.scheme
        self.dtype = DTYPES[self.hf_config.get("dtype", "float16")]
        self.files = SafetensorsFiles(self.path, what="quantized model")
        self._check_complete()

    def _prefix(self, i: int, name: str) -> str:
        return self.family.hf_name(f"layers.{i}.{name}.weight")[: -len(".weight")]

    def _check_complete(self) -> None:
        if self.scheme.is_float:
            return
        key = "weight" if self.scheme.weight.bits == 8 else "weight_packed"
        for i in range(self.config.num_layers):
            for name in self.config.linears:
                if f"{self._prefix(i, name)}.{key}" not in self.files:
                    raise SqDeployError(f"{self.path}: layer {i} {name} has no quantized weight; the directory is incomplete")

    def is_quantized_linear(self, canonical: str) -> bool:
        parts = canonical.split(".")
        return not self.scheme.is_float and parts[0] == "layers" and parts[2] in self.config.linears and parts[-1] == "weight"

    def qweight(self, i: int, name: str) -> qmath.QWeight:
        return decode_linear(self.files, self._prefix(i, name), self.scheme)

    def input_scale(self, i: int, name: str) -> torch.Tensor | None:
        key = f"{self._prefix(i, name)}.input_scale"
        return self.files.read(key).float() if key in self.files else None

    def has(self, canonical: str) -> bool:
        if self.is_quantized_linear(canonical):
            return True
        try:
            return self.family.hf_name(canonical) in self.files
        except KeyError:
            return False

    def get(self, canonical: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.is_quantized_linear(canonical):
            _, i, name, _ = canonical.split(".")
            return qmath.dequantize_weight(self.qweight(int(i), name), self.scheme.weight, dtype)
        return self.files.read(self.family.hf_name(stored_name(self, canonical))).to(dtype)

    def configure_block(self, block: Block) -> None:
        quantize_activations(block, self.config, self.scheme, self.input_scale)

    def smoothing(self) -> dict[str, torch.Tensor]:
        """Smoothing vector per ``layers.{i}.{group}`` (empty for unsmoothed recipes)."""
        from safetensors.torch import load_file

        for name in (SMOOTHING, OLD_SMOOTHING):
            if (self.path / name).exists():
                return load_file(str(self.path / name))
        return {}

    def kv_amax(self) -> list[list[float]]:
        return [layer["kv_amax"] for layer in self.manifest.get("layers", [])]

    def tokenizer_files(self) -> list[Path]:
        from sqdeploy.model.checkpoint import TOKENIZER_FILES

        return [self.path / f for f in TOKENIZER_FILES if (self.path / f).exists()]
