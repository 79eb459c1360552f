"""Backends of the generation engine: ``onnxruntime`` (default for ONNX directories), ``torch``, ``trtllm``."""
