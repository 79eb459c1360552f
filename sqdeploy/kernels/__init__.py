"""Real low-bit execution on the GPU: Triton INT8/INT4 kernels and the model that uses them.

``prepare_model(model, device, source)`` turns the fake-quant reference model into one
whose linears compute with the integer weights of ``source`` (a QuantizedModel);
``load_for_device(source, device)`` builds it straight from the directory. Off the GPU
the same modules run the exact PyTorch arithmetic of :mod:`.reference`, which is how
the CPU test suite holds the whole path to the reference.
"""

from sqdeploy.kernels.decode import GraphDecoder, GraphedForward, greedy_generate, matching_lead
from sqdeploy.kernels.device import check_cuda, check_gpus_for_tp, resolve_device
from sqdeploy.kernels.model import KernelTransformer, StaticKVCache
from sqdeploy.kernels.spec import LinearSpec
from sqdeploy.kernels.swap import build_block, load_for_device, prepare_model

__all__ = [
    "GraphDecoder", "GraphedForward", "KernelTransformer", "LinearSpec", "StaticKVCache", "build_block", "check_cuda",
    "check_gpus_for_tp", "greedy_generate", "load_for_device", "matching_lead", "prepare_model", "resolve_device",
]
