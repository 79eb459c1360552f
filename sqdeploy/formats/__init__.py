"""External formats, each in one place: its directory contract, writer, reader and checker.

``onnx/`` (QDQ / MatMulNBits graphs for ONNX Runtime and TensorRT) and ``trtllm/``
(TensorRT-LLM checkpoints and the Hugging Face unified layout). ``targets`` lists them for
``sq-export --target``; ``readers`` opens any directory sq-deploy can score.
"""
