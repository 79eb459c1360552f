"""Lazy, validated access to a Hugging Face model directory (safetensors only).

Opening a checkpoint reads ``config.json`` and the safetensors headers, nothing else:
tensors are read one at a time, when a layer needs them, which is what lets the
calibration loop keep only one decoder layer in memory. Every problem (missing
directory, pickle-only weights, a truncated shard, a tensor the family needs but the
files lack) is reported up front as one line with the remedy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.families import Family, ModelConfig, family_for_hf_config

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
)


def resolve_model_path(path_or_id: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a hub id downloaded (safetensors and json only)."""
    p = Path(path_or_id).expanduser()
    if p.exists():
        if not p.is_dir():
            raise SqDeployError(f"model path {p} is a file; pass the model directory that holds config.json")
        return p
    text = str(path_or_id)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(
                snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"])
            )
        except Exception as exc:  # network or auth problems: say what failed
            raise SqDeployError(
                f"model '{text}' is not a local directory and could not be downloaded from the hub ({type(exc).__name__}); "
                "pass a local model directory"
            ) from None
    raise SqDeployError(f"model directory {p} does not exist; pass a local Hugging Face model directory")


def read_json(path: Path, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise SqDeployError(f"{what}: {path} is missing") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise SqDeployError(f"{what}: {path} is unreadable ({exc}); restore the file") from None


class SafetensorsFiles:
    """The safetensors files of a directory (index or glob): which file holds which tensor."""

    def __init__(self, path: Path, what: str = "model"):
        self.path = path
        self.what = what
        self.where = self._index_tensors()

    def _shards(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = read_json(index, "safetensors index").get("weight_map", {})
            shards = sorted({self.path / f for f in weight_map.values()})
            missing = [s.name for s in shards if not s.exists()]
            if missing:
                raise SqDeployError(f"{self.path}: shard(s) {', '.join(missing)} listed in the index are missing; re-download or re-export the {self.what}")
            return shards
        shards = sorted(p for p in self.path.glob("*.safetensors") if not p.name.startswith("."))
        if shards:
            return shards
        if any(self.path.glob("*.bin")) or any(self.path.glob("*.pt")):
            raise SqDeployError(
                f"{self.path} holds only pickle weights (.bin/.pt), which sq-deploy does not load; "
                "convert them to safetensors first (e.g. save_pretrained(..., safe_serialization=True) in a trusted environment)"
            )
        raise SqDeployError(f"{self.path} has no *.safetensors weights")

    def _index_tensors(self) -> dict[str, Path]:
        where: dict[str, Path] = {}
        for shard in self._shards():
            try:
                with safe_open(shard, "pt") as f:
                    for key in f.keys():
                        where[key] = shard
            except (SafetensorError, OSError) as exc:
                raise SqDeployError(f"{shard} is truncated or corrupt ({exc}); re-download or re-export the {self.what}") from None
        return where

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def read(self, name: str) -> torch.Tensor:
        """One tensor as stored, checked for NaN/Inf."""
        with safe_open(self.where[name], "pt") as f:
            t = f.get_tensor(name)
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise SqDeployError(f"{self.path}: tensor {name} contains NaN or Inf; the {self.what} is damaged")
        return t


def stored_name(src, canonical: str) -> str:
    """The tensor a source holds for ``canonical``: a tied ``lm_head.weight`` is not stored, the
    embedding stands for it (every exporter writes the head, so every source must answer for it)."""
    return "embed.weight" if canonical == "lm_head.weight" and not src.has(canonical) else canonical


class HFCheckpoint:
    """A model directory: its family, its :class:`ModelConfig` and lazy tensor reads."""

    def __init__(self, path: str | os.PathLike):
        self.path = resolve_model_path(path)
        self.hf_config = read_json(self.path / "config.json", "model config")
        self.family: Family = family_for_hf_config(self.hf_config)
        self.config: ModelConfig = self.family.config_from_hf(self.hf_config)
        self.files = SafetensorsFiles(self.path)
        self._check_complete()

    def _check_complete(self) -> None:
        needed = [self.family.hf_name(n) for n in self.expected_names()]
        missing = [n for n in needed if n not in self.files]
        if missing:
            raise SqDeployError(
                f"{self.path}: {len(missing)} tensor(s) the {self.family.name} layout needs are missing "
                f"(first: {missing[0]}); the checkpoint is incomplete or not a {self.config.architecture}"
            )

    def expected_names(self) -> list[str]:
        """Canonical names of every tensor the reference model reads (lm_head optional when tied)."""
        c = self.config
        names = c.global_names
        for i in range(c.num_layers):
            names += layer_tensor_names(c, i)
        return names

    def has(self, canonical: str) -> bool:
        try:
            return self.family.hf_name(canonical) in self.files
        except KeyError:
            return False

    def get(self, canonical: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Read one tensor by canonical name, checking it for NaN/Inf."""
        return self.get_stored(canonical).to(dtype)

    def get_stored(self, canonical: str) -> torch.Tensor:
        """One tensor in the dtype the file stores it in (checked for NaN/Inf)."""
        return self.files.read(self.family.hf_name(stored_name(self, canonical)))

    def tokenizer_files(self) -> list[Path]:
        return [self.path / f for f in TOKENIZER_FILES if (self.path / f).exists()]


def layer_tensor_names(cfg: ModelConfig, i: int) -> list[str]:
    p = f"layers.{i}."
    names = [p + "attn_norm.weight", p + "mlp_norm.weight"]
    if cfg.norm_has_bias:
        names += [p + "attn_norm.bias", p + "mlp_norm.bias"]
    for lin in cfg.linears:
        names.append(p + lin + ".weight")
        if cfg.linear_has_bias(lin):
            names.append(p + lin + ".bias")
    return names
