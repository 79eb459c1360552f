"""Sampling on the device: the host sampler's rules, per-request seeded generators."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sqdeploy.runtime.device_sampling import DeviceSampler, constrain_row, filter_probs, sample_rows
from sqdeploy.runtime.engine import SamplingParams
from sqdeploy.runtime.sampling import constrain

GEN = torch.Generator().manual_seed(0)


def test_greedy_rows_are_the_argmax():
    logits = torch.randn(5, 50, generator=GEN)
    s = DeviceSampler("cpu", seed=0)
    assert s.sample(logits, [SamplingParams()] * 5, list(range(5))) == logits.argmax(-1).tolist()


def test_seeded_rows_repeat_whatever_shares_the_batch():
    logits = torch.randn(4, 200, generator=GEN)
    p = SamplingParams(temperature=1.0, seed=7)
    free = SamplingParams(temperature=1.0)
    a = [DeviceSampler("cpu").sample(logits[:1], [p], [1])[0] for _ in range(1)]
    runs = []
    for others in (0, 3):
        s = DeviceSampler("cpu")
        got = [s.sample(logits[: 1 + others], [p] + [free] * others, [1, 2, 3, 4][: 1 + others])[0] for _ in range(5)]
        runs.append(got)
    assert runs[0] == runs[1] and runs[0][0] == a[0]
    other_seed = DeviceSampler("cpu")
    diff = [other_seed.sample(logits[:1], [SamplingParams(temperature=1.0, seed=8)], [1])[0] for _ in range(5)]
    assert diff != runs[0]


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    order, probs = filter_probs(logits, torch.ones(2), torch.tensor([2, 0]), torch.tensor([1.0, 0.8]))
    assert order[0].tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(probs[0], torch.tensor([0.625, 0.375, 0.0, 0.0]))
    torch.testing.assert_close(probs[1], torch.tensor([0.625, 0.375, 0.0, 0.0]))  # 0.5 < 0.8 <= 0.8: two tokens
    order, probs = filter_probs(logits[:1], torch.ones(1), torch.tensor([0]), torch.tensor([0.81]))
    assert int((probs > 0).sum()) == 3
    x = torch.randn(64, 100, generator=GEN)
    params = [SamplingParams(temperature=0.7, top_k=5)] * 64
    toks = sample_rows(x, params, torch.rand(64, generator=GEN))
    top5 = x.topk(5, dim=-1).indices
    assert all(int(t) in top5[i].tolist() for i, t in enumerate(toks))


def test_draws_follow_the_distribution():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).repeat(4000, 1)
    toks = sample_rows(logits, [SamplingParams(temperature=1.0)] * 4000, torch.rand(4000, generator=GEN))
    freq = np.bincount(toks.numpy(), minlength=3) / 4000
    assert np.allclose(freq, [0.6, 0.3, 0.1], atol=0.03)


@pytest.mark.parametrize("penalty,min_tokens", [(1.3, 0), (0.8, 0), (1.0, 3)])
def test_constraints_match_the_host_sampler(penalty, min_tokens):
    row = torch.randn(40, generator=GEN)
    p = SamplingParams(max_new_tokens=8, repetition_penalty=penalty, min_tokens=min_tokens)
    hist = SimpleNamespace(seen={1, 5, 9, 39}, tokens=[5], eos_ids={2})
    want = constrain(row.numpy(), p, hist)
    assert np.array_equal(constrain_row(row, p, hist).numpy(), want)
