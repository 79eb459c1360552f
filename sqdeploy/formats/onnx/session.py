"""Running an export in ONNX Runtime: sessions, one forward step, logits for perplexity, greedy decoding.

``exact=True`` turns off ONNX Runtime's QDQ fusions (``session.disable_quant_qdq``),
so QuantizeLinear/DequantizeLinear run as written and the arithmetic is the
reference's; the default lets ONNX Runtime fuse them into integer kernels (faster,
not bit-faithful: see the README's parity table).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from sqdeploy.core.errors import MissingDependencyError, SqDeployError
from sqdeploy.formats.onnx.contract import GRAPH, read_manifest

OPT_LEVELS = ("disable", "basic", "extended", "all")


@dataclass(frozen=True)
class SessionConfig:
    threads: int | None = None
    optimization: str = "all"
    exact: bool = False
    provider: str = "cpu"
    accuracy_level: int = 0  # for DequantizeLinear + MatMul fused by ONNX Runtime into MatMulNBits


def make_session(path: Path, cfg: SessionConfig = SessionConfig()):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = cfg.threads or min(os.cpu_count() or 1, 16)
    so.inter_op_num_threads = 1
    level = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
             "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    so.graph_optimization_level = level[cfg.optimization]
    if cfg.exact:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    # DequantizeLinear + MatMul of weight-only graphs fuse into MatMulNBits, by default with int8 activations
    # (accuracy level 4); keep the export's choice (0 = float activations, as the reference computes)
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(max(1, cfg.accuracy_level)))
    providers = ["CPUExecutionProvider"]
    if cfg.provider.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise MissingDependencyError("onnxruntime-gpu", "running an ONNX export on CUDA")
        providers.insert(0, "CUDAExecutionProvider")
    elif cfg.provider != "cpu":
        raise SqDeployError(f"device {cfg.provider!r}: ONNX exports run on cpu or cuda")
    try:
        return ort.InferenceSession(str(path / GRAPH), so, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph/... types
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise SqDeployError(f"ONNX Runtime cannot load {path / GRAPH} ({reason}); re-export it") from None


class OnnxDecoder:
    """An exported decoder: one forward step with explicit KV cache, plus helpers."""

    def __init__(self, path: str | Path, cfg: SessionConfig = SessionConfig()):
        self.path = Path(path)
        self.meta = read_manifest(self.path)
        if self.meta.get("accuracy_level") and not cfg.accuracy_level:
            cfg = replace(cfg, accuracy_level=self.meta["accuracy_level"])
        self.session = make_session(self.path, cfg)
        self.np_dtype = np.float16 if self.meta["dtype"] == "float16" else np.float32
        self.layers, self.kv_heads, self.head_dim = self.meta["num_layers"], self.meta["num_kv_heads"], self.meta["head_dim"]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return {name: np.zeros(shape, self.np_dtype) for name in self.meta["inputs"][3:]}

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, position_ids: np.ndarray | None = None,
                past: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(logits [B, T, V], past for the next step); positions count real tokens as in the reference."""
        ids = np.asarray(input_ids, dtype=np.int64)
        b, t = ids.shape
        past = past if past is not None else self.empty_past(b)
        p = next(iter(past.values())).shape[2]
        mask = np.ones((b, p + t), np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
        if position_ids is None:
            position_ids = np.clip(np.cumsum(mask, axis=-1) - 1, 0, None)[:, -t:]
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": np.asarray(position_ids, np.int64), **past}
        outs = self.session.run(None, feeds)
        names = self.meta["outputs"]
        present = {n.replace("present.", "past_key_values."): v for n, v in zip(names[1:], outs[1:])}
        return outs[0], present

    def logits_fn(self, ids: torch.Tensor) -> torch.Tensor:
        logits, _ = self.forward(ids.cpu().numpy())
        return torch.from_numpy(logits.astype(np.float32))

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        logits, past = self.forward(np.asarray([prompt]))
        out: list[int] = []
        for _ in range(max_new_tokens):
            out.append(int(logits[0, -1].argmax()))
            n = len(prompt) + len(out)
            logits, past = self.forward(np.asarray([[out[-1]]]), np.ones((1, n), np.int64), np.asarray([[n - 1]]), past)
        return out
