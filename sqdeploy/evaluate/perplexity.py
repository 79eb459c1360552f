"""Perplexity on held-out text, computed the same way for every model and target.

Windows: the whole file is tokenized as one sequence of ``T`` tokens (no special
tokens); with window length ``L`` and ``N`` windows, ``step = max(L, (T - L) // N)``
and window ``i`` is tokens ``[i * step, i * step + L)``. Each window is scored on its
own (no context carried over): mean negative log-likelihood of tokens 2..L.

Anything that maps token ids [1, L] to logits [1, L, V] can be scored, so the
reference model, ONNX Runtime sessions and checkpoint readers share this code.
"""

from __future__ import annotations

import gzip
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from sqdeploy.core.errors import SqDeployError

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.exists():
        raise SqDeployError(f"text file {path} does not exist")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise SqDeployError(f"text file {path} is unreadable ({exc})") from None


def eval_windows(tokenizer, text: str, windows: int = 24, seq_len: int = 512, offset: float = 0.0) -> torch.Tensor:
    """The evaluation windows [N, L] of ``text``: window i starts at ``(i + offset) * step``.

    ``offset`` (in [0, 1)) moves every window by a fraction of the step: with 48 windows and
    offset 0.5 none overlaps the standard 24 (offset 0) once the text holds 4 windows per
    standard step (about 50k tokens for 24 x 512); with 240 windows, once it holds about 0.36 M
    tokens. That is a validation set for choosing recipe settings without tuning them on the
    windows that report the result (the larger one ranks close settings more reliably).
    """
    if not 0.0 <= offset < 1.0:
        raise SqDeployError(f"--window-offset must be in [0, 1), got {offset}")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False).input_ids, dtype=torch.long)  # windowed below
    t = ids.numel()
    if t < seq_len:
        raise SqDeployError(f"the text has {t} tokens, fewer than one window of {seq_len}")
    step = max(seq_len, (t - seq_len) // windows)
    starts = [int((i + offset) * step) for i in range(windows)]
    starts = [s for s in starts if s + seq_len <= t]
    if len(starts) < windows:
        raise SqDeployError(f"the text has {t} tokens: room for {len(starts)} windows of {seq_len}, not {windows}")
    return torch.stack([ids[s : s + seq_len] for s in starts])


@dataclass
class Perplexity:
    ppl: float
    nll: float
    tokens: int
    per_window: list[float]  # each window's perplexity; windows have equal lengths, so log(ppl) is the mean of their logs

    @property
    def per_window_nll(self) -> list[float]:
        return [math.log(p) for p in self.per_window]


@dataclass(frozen=True)
class Change:
    """Relative perplexity change of one model against another on the same windows, with its standard error.

    The error is paired: both models see the same windows, so window-to-window variation of the
    text's difficulty cancels and only the variation of the per-window *difference* counts. That
    is what tells a real difference between two quantized models from the sampling noise of a
    few windows (on 24 windows two INT4 variants can differ by 0.2-0.3% by chance alone).
    """

    relative: float
    stderr: float
    windows: int

    def __str__(self) -> str:
        return format_change(self.relative, self.stderr)


def format_change(relative: float, stderr: float, digits: int = 2) -> str:
    """``+0.48% ± 0.27%``: a relative change and its standard error, in percent."""
    return f"{100 * relative:+.{digits}f}% ± {100 * stderr:.{digits}f}%"


def paired_change(base_nll: Sequence[float], other_nll: Sequence[float]) -> Change:
    """Perplexity change ``exp(mean(other - base)) - 1`` from two models' per-window NLLs on the same
    windows (:attr:`Perplexity.per_window_nll`), and its paired standard error (delta method)."""
    a, b = base_nll, other_nll
    if len(a) != len(b):
        raise SqDeployError(f"paired comparison needs the same windows ({len(a)} vs {len(b)})")
    d = torch.tensor(b, dtype=torch.float64) - torch.tensor(a, dtype=torch.float64)
    mean = float(d.mean())
    se = float(d.std(correction=1)) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return Change(math.exp(mean) - 1, math.exp(mean) * se, len(d))


def perplexity(logits_fn: LogitsFn, windows: torch.Tensor, progress=None) -> Perplexity:
    total, count, per_window = 0.0, 0, []
    with torch.no_grad():
        for w in windows:
            logits = logits_fn(w[None]).float()
            logp = torch.log_softmax(logits[0, :-1], dim=-1)
            nll = -logp.gather(1, w[1:, None]).sum().item()
            total += nll
            count += w.numel() - 1
            per_window.append(math.exp(nll / (w.numel() - 1)))
            if progress is not None:
                progress.advance()
    return Perplexity(math.exp(total / count), total / count, count, per_window)


def model_logits_fn(model: torch.nn.Module) -> LogitsFn:
    device = next(model.parameters()).device
    return lambda ids: model(ids.to(device)).float().cpu()
