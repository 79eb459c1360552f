"""Helpers shared by the Python-backend models; copied beside each model.py as ``sqdeploy_triton.py``."""

import json
import os

import numpy as np


def parameters(args):
    """The model's config.pbtxt parameters as a plain {key: string} dict."""
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def flag(params, key, default):
    return params.get(key, str(default)).strip().lower() in ("1", "true", "yes", "on")


def load_tokenizer(args, params):
    """The tokenizer in ``tokenizer_dir``: absolute, or relative to this model's version directory."""
    from transformers import AutoTokenizer

    path = params["tokenizer_dir"]
    if not os.path.isabs(path):
        path = os.path.join(args["model_repository"], args["model_version"], path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def optional_input(pb_utils, request, name, default):
    """An optional input as a numpy array, or ``default`` when the request omits it."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return default if tensor is None else tensor.as_numpy()


def as_text(value):
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def text_tensor(pb_utils, name, texts):
    return pb_utils.Tensor(name, np.array([t.encode("utf-8") for t in texts], dtype=np.object_))
