"""Calibrate layer by layer, smooth, round: from a Hugging Face checkpoint to the
quantized-model hub (``qmodel``) that every export target reads.

One file per algorithm (``smoothquant``, ``smoothquant_plus``, ``awq``, ``rtn``, ``gptq``),
the layer-streaming driver (``streaming``), recipes and the pipeline that runs them.
"""
