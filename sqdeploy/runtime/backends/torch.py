"""The reference backend: sq-deploy's PyTorch decoder over any directory ``open_model`` reads.

It serves HF checkpoints and quantized directories (fake-quantized, float32) on CPU or
GPU, and is what the other backends are checked against. GPU kernels plug in at
:func:`load_torch_model`, the only place the model is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from sqdeploy.core.errors import SqDeployError
from sqdeploy.runtime.backends.base import ModelInfo, eos_ids_of, load_tokenizer


def load_torch_model(path: Path, device: str):
    """The model of ``path`` on ``device``, the directory holding its tokenizer, and a description.

    This is the one place the served PyTorch model is built: GPU kernels (real INT8/INT4
    linears, tensor parallelism) replace the fake-quant reference here, on ``opened.model``.
    """
    from sqdeploy.formats.readers import open_model
    from sqdeploy.model.transformer import Transformer

    opened = open_model(path, device)
    if not isinstance(opened.model, Transformer):
        raise SqDeployError(
            f"{path} ({opened.kind}) has no PyTorch model to serve; use --backend onnxruntime or trtllm for this directory"
        )
    return opened.model.eval(), opened.tokenizer_path, f"{opened.kind}: {opened.description}"


class TorchBackend:
    name = "torch"

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise SqDeployError(f"--device {device}: no CUDA GPU is visible; use --device cpu")
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.model, tok_path, description = load_torch_model(Path(path), device)
        cfg = self.model.cfg
        self.tokenizer = load_tokenizer(tok_path)
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else (self.tokenizer.pad_token_id or 0)
        self.info = ModelInfo(
            path=Path(path),
            description=description,
            vocab_size=cfg.vocab_size,
            max_positions=cfg.max_positions,
            num_layers=cfg.num_layers,
            eos_ids=eos_ids_of(cfg.eos_token_id, self.tokenizer.eos_token_id),
            pad_id=int(pad),
            tokenizer_path=Path(tok_path),
        )

    @torch.inference_mode()
    def forward(self, input_ids, attention_mask, position_ids, cache):
        from sqdeploy.model.transformer import KVCache

        kv = KVCache(self.info.num_layers)
        if cache is not None:
            kv.k, kv.v = list(cache[0::2]), list(cache[1::2])
        dev = self.device
        logits = self.model(
            torch.from_numpy(input_ids).to(dev),
            position_ids=torch.from_numpy(position_ids).to(dev),
            attention_mask=torch.from_numpy(attention_mask).to(dev),
            cache=kv,
        )
        out = [t for pair in zip(kv.k, kv.v) for t in pair]
        return logits[:, -1].float().cpu().numpy(), out

    def take(self, cache, rows: Sequence[int]):
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=self.device)
        return [c.index_select(0, idx) for c in cache]

    def pad_left(self, cache, n: int):
        if n == 0:
            return cache
        return [torch.cat([c.new_zeros(c.shape[0], c.shape[1], n, c.shape[3]), c], dim=2) for c in cache]

    def concat(self, caches):
        return [torch.cat(layer, dim=0) for layer in zip(*caches)]

    def trim(self, cache, start: int):
        return cache if start == 0 else [c[:, :, start:] for c in cache]


def memory_bytes(backend) -> int | None:
    """Peak accelerator memory of a backend with a ``device`` (torch, kernel), when it runs on a GPU."""
    if backend.device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(backend.device))
    return None
