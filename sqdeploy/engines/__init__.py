"""Engines: turn an export into something a server runs, and say whether it fits.

Each builder wraps an external tool behind a lazy import (``trtllm-build``,
TensorRT's Python API, ONNX Runtime) and first produces a *plan*: the exact command
or settings, the memory it will need per GPU, and every check that can fail before
the long work starts. ``--dry-run`` prints the plan and needs none of those tools.
"""
