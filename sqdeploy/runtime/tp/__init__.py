"""Tensor-parallel execution of TensorRT-LLM checkpoints on the GPU kernels (NCCL) or on CPUs (gloo).

``TPEngine(dir, device)`` starts one process per rank of a checkpoint written by
``sq-export --target trtllm --tp N``; ``build_rank_model(ckpt, rank, device, dtype, comm)``
is one rank's model, for callers that manage their own processes.
"""

from sqdeploy.runtime.tp.engine import TPEngine
from sqdeploy.runtime.tp.parallel import Comm
from sqdeploy.runtime.tp.shards import build_rank_model, spec_from_rank
from sqdeploy.runtime.tp.worker import open_rank_source

__all__ = ["Comm", "TPEngine", "build_rank_model", "open_rank_source", "spec_from_rank"]
