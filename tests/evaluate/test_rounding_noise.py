"""The INT8 rounding-noise comparison: a second draw of the same noise passes, a larger deviation does not."""

import torch

from sqdeploy.evaluate.rounding_noise import RoundingNoise, compare


def _draws(scale: float, seed: int, ref: list[torch.Tensor]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [r + scale * torch.randn(r.shape, generator=g) for r in ref]


def test_same_noise_passes_larger_fails():
    g = torch.Generator().manual_seed(0)
    ref = [3 * torch.randn(1, 256, 64, generator=g) for _ in range(3)]
    noise = RoundingNoise.measure(ref, _draws(0.1, 1, ref))
    same = compare(_draws(0.1, 2, ref), ref, noise)
    assert noise.saturated and same.within_noise and same.explained and abs(same.ratio - 1) < 0.05
    larger = compare(_draws(0.12, 3, ref), ref, noise)  # 44% more squared deviation
    assert not larger.within_noise and larger.ratio > 1.3
    # a top-1 flip where the reference leads by more than any gap the noise moved is unexplained
    wrong = [r.clone() for r in ref]
    pos = int(top2_lead(ref[0]).argmax())
    wrong[0][0, pos] = -wrong[0][0, pos]
    assert not compare(wrong, ref, noise).explained


def top2_lead(r: torch.Tensor) -> torch.Tensor:
    top = r[0].topk(2, dim=-1).values
    return top[:, 0] - top[:, 1]
