"""The slot KV cache: sizing, slot bookkeeping, and slot forwards against the kernel model's own forward.

On the CPU the kernel model runs the reference arithmetic in float32, so a prompt fed in
chunks into a slot and decoded there must give the logits of one full forward of the same
tokens, whatever the other slots hold.
"""

from __future__ import annotations

import pytest
import torch

from sqdeploy.core.errors import SqDeployError
from sqdeploy.kernels import load_for_device
from sqdeploy.kernels.slots import (
    SlotCache,
    SlotDecoder,
    bucket_for,
    decode_rows,
    kv_bytes_per_token,
    plan_slots,
    prefill_chunk,
)
from sqdeploy.model.checkpoint import HFCheckpoint

GEN = torch.Generator().manual_seed(0)


@pytest.fixture(scope="module", params=["llama", "mistral", "opt"])
def kmodel(request, tiny_models):
    return load_for_device(HFCheckpoint(tiny_models[request.param]), "cpu")


def test_plan_slots_from_a_budget():
    assert plan_slots(100, 50, 8, None).slots == 8
    p = plan_slots(100, 50, 8, 100 * 50 * 3 + 99)
    assert (p.slots, p.tokens) == (3, 150) and "150 tokens" in p.describe()
    assert plan_slots(100, 50, 2, 10**9).slots == 2  # never more than the batch size
    with pytest.raises(SqDeployError, match="cannot hold one sequence.*raise --kv-cache-gib"):
        plan_slots(100, 50, 8, 100 * 49)


def test_buckets():
    assert [bucket_for(n, 64) for n in (1, 2, 3, 5, 9, 33, 64)] == [1, 2, 4, 8, 16, 64, 64]
    assert bucket_for(5, 6) == 6 and bucket_for(70, 80) == 80


def test_slots_are_handed_out_lowest_first_and_released_alone(kmodel):
    cache = SlotCache(kmodel, plan_slots(kv_bytes_per_token(kmodel), 64, 4, None))
    assert [cache.acquire() for _ in range(3)] == [0, 1, 2]
    cache.release(1)
    assert cache.acquire() == 1 and cache.free == 1
    with pytest.raises(SqDeployError):
        cache.release(3)


def _full_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


def test_chunked_prefill_and_decode_match_one_forward(kmodel):
    cfg = kmodel.cfg
    cache = SlotCache(kmodel, plan_slots(kv_bytes_per_token(kmodel), cfg.max_positions, 4, None))
    a = torch.randint(3, cfg.vocab_size, (90,), generator=GEN).tolist()  # longer than mistral's window of 64
    b = torch.randint(3, cfg.vocab_size, (7,), generator=GEN).tolist()
    sa, sb = cache.acquire(), cache.acquire()
    prefill_chunk(kmodel, cache, sa, torch.tensor(a[:40]), 0)
    lb = prefill_chunk(kmodel, cache, sb, torch.tensor(b), 0)
    la = prefill_chunk(kmodel, cache, sa, torch.tensor(a[40:]), 40)
    torch.testing.assert_close(la, _full_logits(kmodel, a)[-1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lb, _full_logits(kmodel, b)[-1], rtol=1e-4, atol=1e-4)
    other = [k[sb].clone() for k in cache.k]
    # decode both rows twice; the tokens appended are arbitrary
    dec = SlotDecoder(kmodel, cache)
    cache.active[[sa, sb]] = 1
    for step, (ta, tb) in enumerate([(11, 12), (13, 14)]):
        cache.next_ids[sa], cache.next_ids[sb] = ta, tb
        logits = dec.step([sa, sb])
        a.append(ta)
        b.append(tb)
        torch.testing.assert_close(logits[sa], _full_logits(kmodel, a)[-1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits[sb], _full_logits(kmodel, b)[-1], rtol=1e-4, atol=1e-4)
    assert cache.host_lengths[sa] == len(a) and int(cache.lengths[sb]) == len(b)
    # retiring row a and prefilling a new request in its slot leaves row b's cache untouched
    b_cache = [k[sb, :, : len(b)].clone() for k in cache.k]
    cache.release(sa)
    s = cache.acquire()
    assert s == sa and int(cache.lengths[sa]) == 0
    prefill_chunk(kmodel, cache, s, torch.tensor(b[:3]), 0)
    for k, before in zip(cache.k, b_cache):
        assert torch.equal(k[sb, :, : len(b)], before)
    assert all(torch.equal(k[sb, :, :7], o[:, :7]) for k, o in zip(cache.k, other))


def test_rows_not_decoding_keep_their_length(kmodel):
    cache = SlotCache(kmodel, plan_slots(kv_bytes_per_token(kmodel), 32, 4, None))
    s0, s1 = cache.acquire(), cache.acquire()
    prefill_chunk(kmodel, cache, s0, torch.tensor([5, 6, 7]), 0)
    prefill_chunk(kmodel, cache, s1, torch.tensor([8, 9]), 0)  # mid-prompt: not decoding
    cache.active[s0] = 1
    with torch.no_grad():
        decode_rows(kmodel, cache, 2)
    assert cache.lengths.tolist()[:2] == [4, 2]
    with pytest.raises(SqDeployError, match="gap"):
        prefill_chunk(kmodel, cache, s1, torch.tensor([1]), 3)


def test_rows_prefilled_together_equal_each_alone(kmodel):
    """``prefill_rows``: one batch through the linears, each row's cache and attention its own (every family,
    a prompt past Mistral's sliding window, a second chunk at a later start)."""
    from sqdeploy.kernels.slots import prefill_rows

    cfg = kmodel.cfg
    cache = SlotCache(kmodel, plan_slots(kv_bytes_per_token(kmodel), cfg.max_positions, 4, None))
    ids = torch.randint(3, cfg.vocab_size, (2, 90), generator=GEN)
    first, second = cache.acquire(), cache.acquire()
    la = prefill_rows(kmodel, cache, [second, first], ids[:, :70], 0)
    lb = prefill_rows(kmodel, cache, [second, first], ids[:, 70:], 70)
    for row, slot in enumerate([second, first]):
        full = _full_logits(kmodel, ids[row].tolist())
        torch.testing.assert_close(la[row], full[69], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(lb[row], full[-1], rtol=1e-4, atol=1e-4)
        assert cache.host_lengths[slot] == 90
