"""ONNX Runtime backend: the default for ONNX exports and ONNX Runtime engine directories.

The graph (``sq-export --target onnx``) takes ``input_ids``, ``attention_mask``,
``position_ids`` and ``past_key_values.{i}.key/value`` and returns ``logits`` and
``present.{i}.key/value``; one graph serves prefill and decode. On CPU the cache
stays in numpy arrays between steps (ONNX Runtime reads them in place); on CUDA it
stays on the device as OrtValues through IO binding and only comes to the host when
rows join or leave the batch.

An engine directory (``sq-build --engine onnxruntime``) holds the graph optimised
offline plus ``session.json``; its settings are used as written and its graph is
loaded without optimising it again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sqdeploy.core.errors import MissingDependencyError, SqDeployError
from sqdeploy.formats.onnx.contract import GRAPH, META, is_onnx_dir, read_manifest, read_session, session_graph
from sqdeploy.runtime.backends.base import ModelInfo, NumpyCacheOps, eos_ids_of, load_tokenizer


def graph_file(path: Path, meta: dict[str, Any]) -> Path:
    """The graph to load: the engine's (``session.json`` "model"), the export's ("model_file"), or model.onnx."""
    name = session_graph(path) or meta.get("model_file") or GRAPH
    if not (path / name).exists():
        raise SqDeployError(f"{path / name} is missing; re-export with sq-export --target onnx")
    return path / name


def read_meta(path: Path) -> dict[str, Any]:
    """The export's manifest, as the contract validates it (an engine directory's graph is not the exported one,
    so the files recorded at export are not compared)."""
    return read_manifest(path, verify=False)


@dataclass(frozen=True)
class SessionSettings:
    """How the ONNX Runtime session is made; ``session.json`` of an engine directory, or defaults."""

    execution_provider: str = "CPUExecutionProvider"
    graph_optimization_level: str = "ORT_ENABLE_ALL"
    intra_op_num_threads: int = 0
    inter_op_num_threads: int = 0
    execution_mode: str = "sequential"
    provider_options: dict = field(default_factory=dict)
    prebuilt: bool = False  # graph already optimised offline: load it as is
    exact: bool = False  # run QuantizeLinear/DequantizeLinear as written instead of fused integer kernels

    @classmethod
    def for_dir(cls, path: Path, device: str, threads: int | None, exact: bool = False) -> SessionSettings:
        known = read_session(path)
        if known is not None:
            s = cls(**known, prebuilt=True)
        else:
            ep = "CUDAExecutionProvider" if device.startswith("cuda") else "CPUExecutionProvider"
            s = cls(execution_provider=ep)
        if threads or exact:
            s = SessionSettings(**{**s.__dict__, "intra_op_num_threads": threads or s.intra_op_num_threads, "exact": exact})
        return s

    def make(self, graph: Path):
        import onnxruntime as ort

        so = ort.SessionOptions()
        # an engine's graph was optimised for this provider already; optimising again only costs load time
        level = "ORT_DISABLE_ALL" if self.prebuilt else self.graph_optimization_level
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        so.intra_op_num_threads = int(self.intra_op_num_threads)
        so.inter_op_num_threads = int(self.inter_op_num_threads)
        if self.exact:
            so.add_session_config_entry("session.disable_quant_qdq", "1")
        so.execution_mode = (
            ort.ExecutionMode.ORT_PARALLEL if self.execution_mode == "parallel" else ort.ExecutionMode.ORT_SEQUENTIAL
        )
        available = ort.get_available_providers()
        if self.execution_provider not in available:
            hint = (
                "pip install onnxruntime-gpu"
                if self.execution_provider == "CUDAExecutionProvider"
                else "install an onnxruntime build with it"
            )
            raise MissingDependencyError(
                "onnxruntime-gpu" if "CUDA" in self.execution_provider else "onnxruntime",
                f"running on {self.execution_provider} (available: {', '.join(available)})",
                hint,
            )
        providers = [(self.execution_provider, dict(self.provider_options))]
        if self.execution_provider != "CPUExecutionProvider":
            providers.append(("CPUExecutionProvider", {}))
        return ort.InferenceSession(str(graph), so, providers=providers)


class OnnxRuntimeBackend(NumpyCacheOps):
    name = "onnxruntime"

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None, exact: bool = False):
        path = Path(path)
        if not is_onnx_dir(path):
            raise SqDeployError(
                f"{path} is not an ONNX export ({META} and {GRAPH} missing); "
                "export with sq-export --target onnx or use --backend torch"
            )
        self.meta = meta = read_meta(path)
        self.settings = SessionSettings.for_dir(path, device, threads, exact)
        self.graph = graph_file(path, meta)
        self.session = self.settings.make(self.graph)
        self.layers = int(meta["num_layers"])
        self.kv_shape = (int(meta["num_kv_heads"]), int(meta["head_dim"]))
        self.kv_dtype = np.float16 if meta["dtype"] == "float16" else np.float32
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]
        self.outputs = ["logits"] + [f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]
        self._check_signature(path)
        self.tokenizer = load_tokenizer(path)
        pad = meta.get("pad_token_id")
        pad = pad if pad is not None else (self.tokenizer.pad_token_id or 0)
        kind = "ONNX Runtime engine" if self.settings.prebuilt else "ONNX export"
        self.info = ModelInfo(
            path=path,
            description=f"{kind} ({meta.get('family', '?')}, {meta.get('variant', meta['dtype'])}) "
            f"on {self.settings.execution_provider}",
            vocab_size=int(meta["vocab_size"]),
            max_positions=int(meta["max_positions"]),
            num_layers=self.layers,
            eos_ids=eos_ids_of(meta.get("eos_token_id"), self.tokenizer.eos_token_id),
            pad_id=int(pad),
            tokenizer_path=path,
        )
        self.cuda = self.settings.execution_provider == "CUDAExecutionProvider"

    def _check_signature(self, path: Path) -> None:
        ins = {i.name for i in self.session.get_inputs()}
        outs = {o.name for o in self.session.get_outputs()}
        need_in = {"input_ids", "attention_mask", "position_ids", *self.past_names}
        missing = sorted(need_in - ins) + sorted(set(self.outputs) - outs)
        if missing:
            raise SqDeployError(
                f"{self.graph} does not have the sq-deploy decoder signature (missing {missing[0]}); "
                "re-export with sq-export --target onnx"
            )

    def forward(self, input_ids, attention_mask, position_ids, cache):
        if cache is None:
            empty = np.zeros((input_ids.shape[0], *self.kv_shape[:1], 0, self.kv_shape[1]), self.kv_dtype)
            cache = [empty] * len(self.past_names)
        if self.cuda:
            return self._forward_cuda(input_ids, attention_mask, position_ids, cache)
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        feeds.update(zip(self.past_names, cache))
        logits, *present = self.session.run(self.outputs, feeds)
        return logits[:, -1].astype(np.float32), present

    # -- CUDA: the cache stays on the device between steps
    def _forward_cuda(self, input_ids, attention_mask, position_ids, cache):
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, arr in (("input_ids", input_ids), ("attention_mask", attention_mask), ("position_ids", position_ids)):
            binding.bind_cpu_input(name, np.ascontiguousarray(arr))
        for name, c in zip(self.past_names, cache):
            binding.bind_ortvalue_input(
                name, c if isinstance(c, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(c, "cuda", 0)
            )
        binding.bind_output("logits", "cpu")
        for name in self.outputs[1:]:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        logits, *present = binding.get_outputs()
        return logits.numpy()[:, -1].astype(np.float32), present

    def _host(self, cache) -> list[np.ndarray]:
        return [c if isinstance(c, np.ndarray) else c.numpy() for c in cache]

    def take(self, cache, rows: Sequence[int]):
        return super().take(self._host(cache), rows)

    def pad_left(self, cache, n: int):
        return cache if n == 0 else super().pad_left(self._host(cache), n)

    def concat(self, caches):
        return super().concat([self._host(c) for c in caches])

    def trim(self, cache, start: int):
        return cache if start == 0 else super().trim(self._host(cache), start)
