"""How far two correct evaluations of one model with INT8 activations may differ, measured on the model itself.

With quantized activations a last-bit difference upstream (another summation order, another
CPU's kernels, fused integer arithmetic) moves a value across an INT8 rounding boundary; the
next layers spread that one-step change, and after a few layers every correct implementation
is an independent draw of the same rounding noise. On a small trained model this noise is
large (logits move by ~0.4 at a typical position, top-1 flips at ~3% of positions) and how
often top-1 flips depends on the CPU, so a top-1 bar taken from one machine is no bound.

What does not depend on the CPU is the *size* of the noise: the float64 evaluation of the
same quantized model is another correct draw, so a correct implementation lies as far from
the float32 reference as the float64 one does. Two statistics follow, both measured against
that re-evaluation on the same positions:

* the mean squared logit difference from the float32 reference may exceed the float64
  evaluation's only by sampling error: ``ratio - 1 <= 3`` paired standard errors, the error
  taken over blocks of :data:`BLOCK` positions (neighbouring positions share their flips);
* every top-1 disagreement must sit where the reference's top-2 margin is within the largest
  change of a logit gap the float64 evaluation caused at any position: a flip can only
  overturn a lead it could have produced.

Both need the noise to be common (:attr:`RoundingNoise.saturated`); where flips are rare a plain
top-1 bar works and is used instead.

A wrong scale or weight in one layer raises the first ratio by 20% or more on the shared
model (5 or more standard errors, see the README's ONNX section), while top-1 agreement
cannot tell it from a correct export.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

BLOCK = 64  # positions per block for the paired standard error (fewer when fewer than 8 blocks)
Z_MAX = 3.0  # one-sided: a correct implementation exceeds it about once in 700 runs


def mean_squared_diff(logits: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per position mean squared logit difference [positions] (float64)."""
    return (logits.double() - ref.double()).pow(2).mean(-1).flatten()


def top2_margin(ref: torch.Tensor) -> torch.Tensor:
    top = ref.double().topk(2, dim=-1).values
    return (top[..., 0] - top[..., 1]).flatten()


@dataclass(frozen=True)
class RoundingNoise:
    """The float64 re-evaluation's distance from the float32 reference, per position."""

    msd: torch.Tensor  # [windows, positions] mean squared logit difference
    gap: float  # largest change of any logit gap (max - min of the difference) at any position
    top1: float = 0.0  # top-1 agreement of the two evaluations

    @property
    def saturated(self) -> bool:
        """Whether flips are common enough for the float64 evaluation to be a fair draw of the noise: at
        >= 99% top-1 agreement a few flips that one evaluation happens to have and the other not would
        dominate the comparison (a small or random model), and plain top-1 agreement is the better bar."""
        return self.top1 < 0.99

    def first(self, windows: int, positions: int) -> "RoundingNoise":
        """The noise of the first ``positions`` of the first ``windows`` (a causal model's logits there are
        those of the shorter windows); the gap stays the whole set's, an upper bound."""
        return RoundingNoise(self.msd[:windows, :positions], self.gap, self.top1)

    @classmethod
    def measure(cls, ref32: Iterable[torch.Tensor], ref64: Iterable[torch.Tensor]) -> "RoundingNoise":
        msd, gap, agree = [], 0.0, []
        for a, b in zip(ref32, ref64):  # one window at a time: ref64 may be a generator
            d = b.double() - a.double()
            msd.append(d.pow(2).mean(-1).reshape(-1, d.shape[-2]))
            gap = max(gap, float((d.amax(-1) - d.amin(-1)).max()))
            agree.append((a.argmax(-1) == b.argmax(-1)).flatten())
        return cls(torch.cat(msd), gap, float(torch.cat(agree).double().mean()))


@dataclass(frozen=True)
class NoiseComparison:
    """An implementation's logits against the float32 reference, judged by :class:`RoundingNoise`."""

    ratio: float  # its mean squared difference / the float64 evaluation's
    stderr: float  # paired standard error of the ratio over blocks of BLOCK positions
    top1: float  # top-1 agreement with the reference
    disagreements: int
    unexplained: int  # disagreements where the reference's lead exceeds the noise's largest gap change
    gap: float

    @property
    def within_noise(self) -> bool:
        return self.ratio - 1 <= Z_MAX * self.stderr

    @property
    def explained(self) -> bool:
        return self.unexplained == 0

    def describe(self) -> str:
        return (f"mean squared logit difference {self.ratio:.3f}x the float64 re-evaluation's "
                f"(± {self.stderr:.3f}, limit 1 + {Z_MAX:.0f} s.e.)")

    def describe_top1(self) -> str:
        return (f"{100 * self.top1:.2f}%; {self.disagreements - self.unexplained} of {self.disagreements} "
                f"disagreements where the reference's top-2 margin <= {self.gap:.3f} (the float64 re-evaluation's "
                f"largest logit-gap change; all must be)")


def window_stats(logits: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One window's per-position mean squared difference, top-1 agreement and reference top-2 margin."""
    return mean_squared_diff(logits, ref), (logits.argmax(-1) == ref.argmax(-1)).flatten(), top2_margin(ref)


def compare(logits: list[torch.Tensor], ref32: list[torch.Tensor], noise: RoundingNoise) -> NoiseComparison:
    """``logits``, ``ref32``: per window [1, L, V], the same positions as ``noise`` was measured on."""
    return compare_stats([window_stats(o, r) for o, r in zip(logits, ref32)], noise)


def compare_stats(stats: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], noise: RoundingNoise) -> NoiseComparison:
    """:func:`compare` from each window's :func:`window_stats` (so the logits need not be kept)."""
    msd, agree, margin = (torch.cat(t) for t in zip(*stats))
    base = noise.msd.flatten()
    if msd.numel() != base.numel():
        raise ValueError(f"{msd.numel()} positions compared, the noise was measured on {base.numel()}")
    size = BLOCK if msd.numel() >= 8 * BLOCK else max(1, msd.numel() // 8)  # short checks: at least 8 blocks
    blocks = msd.numel() // size
    a, b = msd[: blocks * size].view(blocks, size).mean(1), base[: blocks * size].view(blocks, size).mean(1)
    d = (a - b) / base.mean()
    stderr = float(d.std(correction=1)) / math.sqrt(blocks) if blocks > 1 else 0.0
    return NoiseComparison(ratio=float(msd.mean() / base.mean()), stderr=stderr, top1=float(agree.double().mean()),
                           disagreements=int((~agree).sum()), unexplained=int(((~agree) & (margin > noise.gap)).sum()),
                           gap=noise.gap)
