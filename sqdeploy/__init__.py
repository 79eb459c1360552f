"""sq-deploy: smooth, quantize, export, build, serve and benchmark Hugging Face causal LMs."""

__version__ = "0.1.0"
