"""Read a TensorRT-LLM checkpoint back: per rank for a tensor-parallel engine, merged for PyTorch.

:class:`TrtllmCheckpoint` validates the directory like ``sq-check trtllm`` (config,
files, names, shapes, dtypes; values as they are read) and then offers

* per rank: :meth:`~TrtllmCheckpoint.rank_linear` (one canonical linear's slice on a
  rank, split back out of TensorRT-LLM's fused modules) and
  :meth:`~TrtllmCheckpoint.rank_globals`;
* merged: the tensor-source interface (``get``/``has``/``configure_block``), so
  ``load_model(TrtllmCheckpoint(dir))`` runs the checkpoint in PyTorch with its own
  quantization semantics: integer weights times scales, the pre-quant scale on the
  input, static per-tensor or dynamic per-token INT8 activations, and for weight-only
  float checkpoints trtllm-build's own per-rank quantization.

A checkpoint whose MLP sq-deploy padded (``producer.unpadded_intermediate_size``) is read at
its padded ``intermediate_size``, as TensorRT-LLM builds it: the padded rows and columns are
zero, so both views compute the unpadded model's logits.

With an INT8 KV cache the context phase is unaffected (TensorRT-LLM's context
attention reads the float K/V; only cached K/V are stored in INT8), so perplexity is
computed without it; :meth:`~TrtllmCheckpoint.kv_cache` gives a cache that stores K/V
the way the engine does, for generation.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.families import Family, ModelConfig
from sqdeploy.formats.opened import OpenedModel, OpenedReader
from sqdeploy.formats.trtllm.config import CheckpointSpec
from sqdeploy.formats.trtllm.layout import CheckResult, check_layout
from sqdeploy.formats.trtllm.linear import DTYPES, RankLinear, decode
from sqdeploy.formats.trtllm.modules import Int8KVCache, TrtLinear
from sqdeploy.formats.trtllm.names import LAYER, global_rows, rows_per_rank
from sqdeploy.formats.trtllm.shard import merge, owners, unfuse
from sqdeploy.model.transformer import Block, KVCache


class TrtllmCheckpoint:
    """A validated TensorRT-LLM checkpoint directory (tensor-parallel ranks, pp 1)."""

    def __init__(self, path: str | Path, validate: bool = True, spec: CheckpointSpec | None = None):
        from sqdeploy.core.integrity import verify_recorded_files

        self.path = Path(path)
        verify_recorded_files(self.path)
        if spec is None or validate:
            res = CheckResult()
            check_layout(self.path, res)
            if not res.ok:
                raise SqDeployError(f"{self.path}: {res.first_failure()}; run 'sq-check trtllm {self.path}' for the full report")
            spec = res.spec
        self.spec: CheckpointSpec = spec
        self.config: ModelConfig = spec.config
        self.family: Family = spec.family
        self.tp: int = spec.tp
        self.quant_algo: str | None = spec.quant.algo
        self.kv_cache_quant_algo: str | None = spec.quant.kv
        self.group_size: int | None = spec.quant.group_size if spec.quant.groupwise else None
        self.dtype = DTYPES[spec.dtype]
        self._module_of = {n: m for m, info in self.family.trtllm.linears.items() for n in info.fuse}
        self._norm_of = {c: n for n, c in self.family.trtllm.norms.items()}
        self._global_of = {c: (n, split) for n, (c, split) in self.family.trtllm.globals.items()}
        self._files: dict[int, object] = {}
        self._last: tuple | None = None
        self._merged: tuple[int, dict[str, RankLinear]] | None = None

    # ------------------------------------------------------------------ per rank
    def _file(self, rank: int):
        if rank not in self._files:
            self._files[rank] = safe_open(self.path / f"rank{rank}.safetensors", "pt")
        return self._files[rank]

    def read(self, rank: int, name: str) -> torch.Tensor:
        """One tensor of one rank file, checked for NaN/Inf."""
        t = self._file(rank).get_tensor(name)
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise SqDeployError(f"{self.path}: rank{rank} tensor {name} contains NaN or Inf; the checkpoint is damaged")
        return t

    def _module(self, rank: int, layer: int, module: str) -> RankLinear:
        key = (rank, layer, module)
        if self._last is None or self._last[0] != key:
            prefix = LAYER.format(i=layer) + module + "."
            names = [k for k in self._file(rank).keys() if k.startswith(prefix) and "." not in k[len(prefix):]]
            tensors = {n[len(prefix):]: self.read(rank, n) for n in names}
            parallel = self.family.trtllm.linears[module].tp
            self._last = (key, decode(tensors, self.spec.quant, parallel, self.dtype))
        return self._last[1]

    def rank_linear(self, rank: int, layer: int, name: str) -> RankLinear:
        """Canonical linear ``name`` ('q', 'k', ..., 'down') of ``layer`` as rank ``rank`` holds it."""
        if name not in self._module_of:
            raise SqDeployError(f"unknown linear {name!r}; {self.family.name} has {', '.join(self._module_of)}")
        module = self._module_of[name]
        lin = self._module(rank, layer, module)
        fuse = self.family.trtllm.linears[module].fuse
        if len(fuse) == 1:
            return lin
        return unfuse(lin, rows_per_rank(self.config, fuse, self.tp))[fuse.index(name)]

    def rank_globals(self, rank: int) -> dict[str, torch.Tensor]:
        """Canonical non-linear tensors of a rank, float32, as the checkpoint stores them.

        ``embed.weight`` / ``lm_head.weight``: this rank's block of the zero-padded
        vocabulary (rows ``rank * n`` ...) when split, else whole; ``pos_embed.weight``:
        this rank's block of TensorRT-LLM's position table (no HF offset rows); norms
        (with any folded smoothing) whole.
        """
        out = {canonical: self.read(rank, name).float() for name, (canonical, _) in self.family.trtllm.globals.items()}
        for i in range(self.config.num_layers):
            for norm, canonical in self.family.trtllm.norms.items():
                for p in ("weight", "bias") if self.config.norm_has_bias else ("weight",):
                    out[f"layers.{i}.{canonical}.{p}"] = self.read(rank, f"{LAYER.format(i=i)}{norm}.{p}").float()
        return out

    def kv_scales(self) -> list[float] | None:
        if self.kv_cache_quant_algo != "INT8":
            return None
        return [float(self.read(0, f"{LAYER.format(i=i)}attention.kv_cache_scaling_factor")) for i in range(self.config.num_layers)]

    def kv_cache(self) -> KVCache:
        scales = self.kv_scales()
        return KVCache(self.config.num_layers) if scales is None else Int8KVCache(scales)

    # ------------------------------------------------------------------ merged (tensor source)
    def merged_linear(self, layer: int, name: str) -> RankLinear:
        if self._merged is None or self._merged[0] != layer:
            self._merged = (layer, {n: merge([self.rank_linear(r, layer, n) for r in owners(self.config, n, self.tp)]) for n in self.config.linears})
        return self._merged[1][name]

    def has(self, canonical: str) -> bool:
        try:
            self._locate(canonical)
            return True
        except SqDeployError:
            return False

    def _locate(self, canonical: str):
        parts = canonical.split(".")
        if canonical in self._global_of:
            return "global", self._global_of[canonical]
        if parts[0] == "layers" and len(parts) == 4:
            if parts[2] in self._module_of and parts[3] in ("weight", "bias"):
                return "linear", (int(parts[1]), parts[2], parts[3])
            if parts[2] in self._norm_of and parts[3] in ("weight", "bias"):
                return "norm", f"{LAYER.format(i=int(parts[1]))}{self._norm_of[parts[2]]}.{parts[3]}"
        raise SqDeployError(f"{self.path}: no tensor for {canonical!r}")

    def _global(self, canonical: str, name: str, split: str) -> torch.Tensor:
        whole = split == "replicated" or (split == "embedding" and not self.spec.parallel_embedding)
        t = self.read(0, name) if whole else torch.cat([self.read(r, name) for r in range(self.tp)])
        if split == "replicated":
            return t
        t = t[: global_rows(self.config, canonical)]
        if canonical == "pos_embed.weight" and self.config.pos_offset:
            t = torch.cat([t.new_zeros(self.config.pos_offset, t.shape[1]), t])
        return t

    def get(self, canonical: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        kind, where = self._locate(canonical)
        if kind == "global":
            return self._global(canonical, *where).to(dtype)
        if kind == "norm":
            return self.read(0, where).to(dtype)
        layer, name, what = where
        lin = self.merged_linear(layer, name)
        t = lin.weight if what == "weight" else lin.bias
        if t is None:
            raise SqDeployError(f"{self.path}: layer {layer} {name} has no {what}")
        return t.to(dtype)

    def configure_block(self, block: Block) -> None:
        """Activation quantization and pre-quant scales of every linear, as the checkpoint prescribes."""
        for name in self.config.linears:
            lin = self.merged_linear(block.index, name)
            mod = block.linear(name)
            mod.act = lin.scheme.act
            mod.input_scale = None if lin.act_scale is None else lin.act_scale.to(mod.weight.device)
            pqs = lin.pre_quant_scale
            pqs = None if pqs is None or bool((pqs == 1).all()) else pqs
            chunks = self.tp if lin.parallel == "row" and lin.scheme.act.kind == "dynamic_token" else 1
            if pqs is not None or chunks > 1:
                parent = block.attn if name in ("q", "k", "v", "o") else block.mlp
                setattr(parent, name, TrtLinear(mod, pqs, chunks))


def is_trtllm_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not (cfg.exists() and (path / "rank0.safetensors").exists()):
        return False
    try:
        raw = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(raw, dict) and "mapping" in raw and "architecture" in raw


def open_checkpoint(path: Path, device: str):
    from sqdeploy.evaluate.perplexity import model_logits_fn
    from sqdeploy.model.loading import load_model

    ck = TrtllmCheckpoint(path)
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer.model").exists():
        raise SqDeployError(f"{path} has no tokenizer files; copy the model's tokenizer.json and tokenizer_config.json into it")
    model = load_model(ck, torch.float32, device)
    desc = f"TensorRT-LLM checkpoint, {ck.config.architecture}, quant_algo {ck.quant_algo}, tp {ck.tp}"
    return OpenedModel("trtllm", path, model_logits_fn(model), path, desc, model)


READER = OpenedReader("trtllm", is_trtllm_dir, open_checkpoint)
