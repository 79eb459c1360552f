"""Perplexity of an export next to the quantized model it came from, on the same windows.

When the export re-quantizes (symmetric INT4 from an asymmetric recipe, weight-only
layouts trtllm-build quantizes itself), the two numbers differ and both are reported with
the paired standard error of their difference (a few windows cannot tell a 0.3% change from
noise); otherwise they agree to float rounding.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sqdeploy.evaluate.perplexity import eval_windows, model_logits_fn, paired_change, perplexity, read_text
from sqdeploy.model.tokenizer import load_tokenizer
from sqdeploy.quantize.qmodel import QuantizedModel


def compare_perplexity(qdir: Path, export: Path, text: str, windows: int = 24, seq_len: int = 512) -> dict:
    from sqdeploy.formats.trtllm.reader import TrtllmCheckpoint
    from sqdeploy.model.loading import load_model

    qm = QuantizedModel(qdir)
    tokenizer = load_tokenizer(qdir)
    ids = eval_windows(tokenizer, read_text(text), windows, seq_len)
    values = {}
    for name, src in (("quantized model (sq-eval)", qm), ("TensorRT-LLM checkpoint (reader)", TrtllmCheckpoint(export))):
        model = load_model(src, torch.float32)
        values[name] = perplexity(model_logits_fn(model), ids)
        del model
    change = paired_change(*(v.per_window_nll for v in values.values()))
    return {"text": str(text), "windows": windows, "seq_len": seq_len, "values": {k: v.ppl for k, v in values.items()},
            "relative_difference": change.relative, "relative_difference_stderr": change.stderr}
