"""A quantized model held in memory with the QuantizedModel interface (qweight/input_scale/get).

The GPU benchmark quantizes the shared model on the device itself; writing and
re-reading a QuantizedModel directory there would need compressed-tensors (and its
dependencies) on a machine that cannot install packages. The values are the ones
the directory would hold: norms and globals rounded through the storage dtype,
integer weights as the algorithm produced them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sqdeploy.model.checkpoint import HFCheckpoint
from sqdeploy.model.loading import quantize_activations
from sqdeploy.model.transformer import Block
from sqdeploy.quantize.pipeline import Calibration, Runtime, quantize, storage_dtype
from sqdeploy.quantize.recipes import Recipe, load_recipe


class InMemoryQuantized:
    def __init__(self, model_dir: str | Path, recipe, calib: Calibration, runtime: Runtime):
        self.ck = HFCheckpoint(model_dir)
        self.config, self.family = self.ck.config, self.ck.family
        rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        self.scheme = rec.scheme
        self.dtype = storage_dtype(rec, self.config)
        self.blocks: list[Block] = []
        self.qweights: list[dict] = []

        def keep(record):
            self.blocks.append(record.block.to("cpu"))
            self.qweights.append({n: _cpu(q) for n, q in record.result.qweights.items()})

        self.result = quantize(self.ck, rec, calib, runtime, keep)

    def qweight(self, i: int, name: str):
        return self.qweights[i][name]

    def input_scale(self, i: int, name: str) -> torch.Tensor | None:
        s = self.blocks[i].linear(name).input_scale
        return None if s is None else s.float().cpu().reshape(1)

    def has(self, canonical: str) -> bool:
        if canonical.startswith("layers."):
            return self._layer_tensor(canonical) is not None
        return self.ck.has(canonical)

    def _layer_tensor(self, canonical: str) -> torch.Tensor | None:
        _, i, local = canonical.split(".", 2)
        block = self.blocks[int(i)]
        module_name, param = local.rsplit(".", 1)
        return getattr(block.module(module_name), param, None)

    def get(self, canonical: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if canonical.startswith("layers."):
            return self._layer_tensor(canonical).detach().to(dtype)
        return self.ck.get(canonical, self.dtype).to(dtype)  # rounded through the storage dtype

    def configure_block(self, block: Block) -> None:
        quantize_activations(block, self.config, self.scheme, self.input_scale)


def _cpu(qw):
    from sqdeploy.core.qmath import QWeight

    return QWeight(qw.q.cpu(), qw.scale.cpu(), None if qw.zero is None else qw.zero.cpu())


def quantize_in_memory(model_dir, recipe, calib_path: str, samples: int = 8, seq_len: int = 128,
                       device: str = "cpu") -> InMemoryQuantized:
    return InMemoryQuantized(model_dir, recipe, Calibration(calib_path, samples, seq_len),
                             Runtime(device=device, progress=False))
