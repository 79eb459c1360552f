"""TensorRT-LLM backend: its executor over engines built by ``sq-build`` (``trtllm-build``).

TensorRT-LLM batches in flight on its own (paged KV cache, its own scheduler), so
this backend implements the :class:`~sqdeploy.runtime.engine.Engine` interface
directly: requests go to ``tensorrt_llm.bindings.executor.Executor`` and its
streamed tokens come back through the same :class:`~sqdeploy.runtime.sequence.Sequence`
bookkeeping as every other backend (stop strings, text, timings). TensorRT-LLM is
imported only when an engine is opened.
"""

from __future__ import annotations

import datetime
import json
import threading
import traceback
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

from sqdeploy.core.errors import MissingDependencyError, SqDeployError
from sqdeploy.runtime.backends.base import eos_ids_of, load_tokenizer
from sqdeploy.runtime.engine import EngineInfo, EventSink, GenerationRequest, InvalidRequestError, SamplingParams
from sqdeploy.runtime.sequence import Sequence


def is_trtllm_engine_dir(path: Path) -> bool:
    path = Path(path)
    return (path / "config.json").exists() and any(path.glob("rank*.engine"))


def read_engine_config(path: Path) -> dict[str, Any]:
    """The engine's ``config.json`` (``pretrained_config`` + ``build_config``), checked for what serving needs."""
    path = Path(path)
    if not is_trtllm_engine_dir(path):
        raise SqDeployError(
            f"{path} is not a TensorRT-LLM engine directory (config.json and rank*.engine); "
            "build one with sq-build --engine trtllm"
        )
    cfg = json.loads((path / "config.json").read_text())
    if "pretrained_config" not in cfg or "build_config" not in cfg:
        raise SqDeployError(
            f"{path / 'config.json'} lacks pretrained_config/build_config; rebuild the engine with sq-build --engine trtllm"
        )
    return cfg


def request_kwargs(prompt_ids: list[int], params: SamplingParams, eos_id: int | None, pad_id: int) -> dict[str, Any]:
    """Keyword arguments of ``executor.Request`` (and of its ``SamplingConfig`` under ``sampling_config``).

    Greedy is ``top_k=1`` in TensorRT-LLM; ``end_id`` -1 never matches, which is how
    ``ignore_eos`` is expressed. Stop strings are handled here, not by TensorRT-LLM, so that
    every backend cuts text the same way.
    """
    sampling: dict[str, Any] = {"beam_width": 1}
    if params.greedy:
        sampling["top_k"] = 1
    else:
        sampling.update(temperature=float(params.temperature), top_p=float(params.top_p))
        if params.top_k:
            sampling["top_k"] = int(params.top_k)
    if params.seed is not None:
        sampling["seed"] = int(params.seed)
    if params.min_tokens:
        sampling["min_tokens"] = int(params.min_tokens)
    if params.repetition_penalty != 1.0:
        sampling["repetition_penalty"] = float(params.repetition_penalty)
    end_id = -1 if params.ignore_eos or eos_id is None else int(eos_id)
    return {
        "input_token_ids": list(prompt_ids),
        "max_tokens": int(params.max_new_tokens),
        "streaming": True,
        "end_id": end_id,
        "pad_id": int(pad_id),
        "sampling_config": sampling,
    }


def _executor_module():
    try:
        import tensorrt_llm.bindings.executor as trtllm
    except ImportError:
        raise MissingDependencyError(
            "tensorrt_llm", "serving a TensorRT-LLM engine", "pip install 'sq-deploy[trtllm]' (Linux with an NVIDIA GPU)"
        ) from None
    return trtllm


class TrtllmEngine:
    """The Engine interface over ``tensorrt_llm.bindings.executor.Executor``."""

    def __init__(self, path: str | Path, name: str | None = None, tokenizer_dir: str | Path | None = None):
        path = Path(path)
        cfg = read_engine_config(path)
        self.trtllm = _executor_module()
        pre, build = cfg["pretrained_config"], cfg["build_config"]
        self.tokenizer = load_tokenizer(Path(tokenizer_dir or path))
        self.eos_ids = eos_ids_of(self.tokenizer.eos_token_id)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        max_pos = int(build.get("max_seq_len") or pre.get("max_position_embeddings"))
        self.info = EngineInfo(
            name or path.name,
            path,
            "trtllm",
            f"TensorRT-LLM engine ({pre.get('architecture', '?')}, "
            f"{pre.get('dtype', '?')}, {pre.get('quantization', {}).get('quant_algo')})",
            max_pos,
            int(pre["vocab_size"]),
        )
        self.executor = self.trtllm.Executor(path, self.trtllm.ModelType.DECODER_ONLY, self.trtllm.ExecutorConfig(1))
        self._live: dict[int, Sequence] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="sq-trtllm", daemon=True)
        self._thread.start()

    def submit(self, requests: Seq[GenerationRequest], sink: EventSink) -> list[Sequence]:
        if self._stopping:
            raise InvalidRequestError("the engine is shutting down; retry on another replica")
        out = []
        eos = min(self.eos_ids) if self.eos_ids else None
        for r in requests:
            seq = Sequence(r, sink, self.tokenizer, self.eos_ids)
            kw = request_kwargs(r.prompt_ids, r.params, eos, self.pad_id)
            kw["sampling_config"] = self.trtllm.SamplingConfig(**kw["sampling_config"])
            with self._lock:
                self._live[self.executor.enqueue_request(self.trtllm.Request(**kw))] = seq
            out.append(seq)
        return out

    def stats(self) -> dict[str, int]:
        return {"waiting": 0, "running": len(self._live)}

    def _loop(self) -> None:
        while not (self._stopping and not self._live):
            for resp in self.executor.await_responses(datetime.timedelta(milliseconds=20)):
                try:
                    self._handle(resp)
                except Exception:  # noqa: BLE001 - one bad response must not stop serving
                    traceback.print_exc()
            with self._lock:
                for rid, seq in list(self._live.items()):
                    if seq.cancelled and seq.finish_reason is None:
                        self.executor.cancel_request(rid)
                        seq.sink([seq.finish("cancelled")])
                        del self._live[rid]

    def _handle(self, resp) -> None:
        with self._lock:
            seq = self._live.get(resp.request_id)
        if seq is None or seq.finish_reason is not None:
            return
        if resp.has_error():
            events = [seq.finish("error", error=resp.error_msg)]
        else:
            events = [seq.append(int(t)) for t in resp.result.output_token_ids[0] if seq.finish_reason is None]
            if seq.finish_reason is None and resp.result.is_final:
                events.append(seq.finish("stop"))
        if seq.finish_reason is not None:
            with self._lock:
                self._live.pop(resp.request_id, None)
            if not resp.has_error() and not resp.result.is_final:
                self.executor.cancel_request(resp.request_id)  # stopped by a stop string
        seq.sink(events)

    def shutdown(self, drain: bool = True) -> None:
        if not drain:
            for seq in list(self._live.values()):
                seq.cancel()
        self._stopping = True
        self._thread.join()
        self.executor.shutdown()
