"""Triton's model statistics (``GET /v2/models/{name}/stats``), the KServe ``statistics`` extension.

Every generated sequence is one inference, whichever protocol asked for it. ``success``
and ``fail`` hold how many sequences ended each way and their total time from arrival;
``queue`` the time waiting for a batch slot; ``compute_infer`` the time from admission to
the last token (prefill, decoding and detokenization together, so ``compute_input`` and
``compute_output`` stay zero). ``execution_count`` counts the HTTP calls that produced at
least one sequence (a call may batch several prompts, as one Triton execution does).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += max(0, int(seconds * 1e9))

    def to_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class InferenceStats:
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    executions: int = 0
    last_inference_ms: int = 0

    def succeeded(self, e2e: float, queue: float | None, compute: float | None) -> None:
        self.success.add(e2e)
        if queue is not None:
            self.queue.add(queue)
        if compute is not None:
            self.compute_infer.add(compute)
        self.last_inference_ms = int(time.time() * 1000)

    def failed(self, seconds: float) -> None:
        self.fail.add(seconds)

    def model_stats(self, name: str, version: str) -> dict:
        zero = Duration().to_dict()
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.success.count,
            "execution_count": self.executions,
            "inference_stats": {
                "success": self.success.to_dict(),
                "fail": self.fail.to_dict(),
                "queue": self.queue.to_dict(),
                "compute_input": zero,
                "compute_infer": self.compute_infer.to_dict(),
                "compute_output": zero,
                "cache_hit": zero,
                "cache_miss": zero,
            },
            "response_stats": {},
            "batch_stats": [],
            "memory_usage": [],
        }
