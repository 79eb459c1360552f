"""Sampling filters, incremental detokenization and stop strings: the per-request logic every backend shares."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from sqdeploy.runtime.backends.trtllm import request_kwargs
from sqdeploy.runtime.engine import GenerationRequest, SamplingParams, encode_prompt, generate
from sqdeploy.runtime.sampling import constrain, sample, sample_row
from sqdeploy.runtime.sequence import IncrementalDetokenizer, Sequence


@pytest.fixture(scope="module")
def tokenizer(shared_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(shared_model))


def test_filters_restrict_the_support():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    rng = np.random.default_rng(0)
    draw = lambda **kw: {sample_row(logits, SamplingParams(temperature=1.0, **kw), rng) for _ in range(400)}
    assert draw() == {0, 1, 2, 3}
    assert draw(top_k=2) == {0, 1}
    assert draw(top_p=0.79) == {0, 1}  # 0.5 + 0.3 reaches 0.79
    assert draw(top_p=0.5) == {0}
    assert draw(top_k=3, top_p=0.99) == {0, 1, 2}
    counts = np.bincount([sample_row(logits, SamplingParams(temperature=1.0), rng) for _ in range(4000)], minlength=4) / 4000
    assert np.allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    sharp = [sample_row(logits, SamplingParams(temperature=0.05), rng) for _ in range(100)]
    assert set(sharp) == {0}


def test_greedy_rows_and_seeded_rows_in_one_batch():
    logits = np.random.default_rng(1).normal(size=(3, 50)).astype(np.float32)
    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=5), SamplingParams(top_k=1, temperature=2.0)]
    a = sample(logits, params, [np.random.default_rng(p.seed) for p in params])
    b = sample(logits, params, [np.random.default_rng(p.seed) for p in params])
    assert a == b and a[0] == int(logits[0].argmax()) and a[2] == int(logits[2].argmax())


def test_detokenizer_never_splits_a_character(tokenizer):
    text = "def héllo():  # wörld, 日本語 ✓\n    return '€'"
    ids = tokenizer(text).input_ids
    detok = IncrementalDetokenizer(tokenizer, [])
    pieces = [detok.push(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_window_decoder_is_the_tokenizers_decode(tokenizer, shared_model):
    """The detokenizer's fast path decodes exactly as ``tokenizer.decode`` with its settings, special tokens
    and characters split over tokens included; a tokenizer without a Rust backend keeps ``decode``."""
    from sqdeploy.runtime.sequence import window_decoder

    fast = window_decoder(tokenizer)
    text = "def héllo():  # wörld, 日本語 ✓\n    return '€'"
    ids = tokenizer(text).input_ids + [tokenizer.eos_token_id]
    rng = np.random.default_rng(0)
    windows = [ids[i:j] for i in range(len(ids)) for j in range(i, min(len(ids), i + 7) + 1)]
    windows += [rng.integers(0, tokenizer.vocab_size, int(rng.integers(1, 8))).tolist() for _ in range(300)]
    for w in windows:
        assert fast(w) == tokenizer.decode(w, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    class Plain:  # no backend_tokenizer: transformers' decode is used as before
        def decode(self, ids, skip_special_tokens, clean_up_tokenization_spaces):
            return "|".join(map(str, ids))

    assert window_decoder(Plain())([1, 2]) == "1|2"


def test_stop_strings_cut_the_text_and_are_held_back_while_streaming(tokenizer):
    ids = tokenizer("alpha beta gamma delta").input_ids
    seq = Sequence(
        GenerationRequest([1], SamplingParams(max_new_tokens=20, stop=("gamma d", "zeta"))), None, tokenizer, frozenset({2})
    )
    events = [seq.append(t) for t in ids]
    final = next(e for e in events if e.finish_reason)
    assert final.finish_reason == "stop" and final.completion.text == "alpha beta "
    streamed = "".join(e.text for e in events[: events.index(final) + 1])
    assert streamed == "alpha beta "
    seq = Sequence(GenerationRequest([1], SamplingParams(max_new_tokens=20)), None, tokenizer, frozenset({2}))
    assert seq.append(ids[0]).finish_reason is None and seq.append(2).finish_reason == "stop"
    assert seq.finish_reason == "stop" and seq.tokens == [ids[0]]
    seq = Sequence(GenerationRequest([1], SamplingParams(max_new_tokens=2, ignore_eos=True)), None, tokenizer, frozenset({2}))
    assert seq.append(2).finish_reason is None and seq.append(2).finish_reason == "length"


def test_trtllm_request_translation():
    greedy = request_kwargs([5, 6], SamplingParams(max_new_tokens=7), eos_id=2, pad_id=3)
    assert greedy == {
        "input_token_ids": [5, 6],
        "max_tokens": 7,
        "streaming": True,
        "end_id": 2,
        "pad_id": 3,
        "sampling_config": {"beam_width": 1, "top_k": 1},
    }
    sampled = request_kwargs([5], SamplingParams(temperature=0.7, top_k=40, top_p=0.9, seed=11, ignore_eos=True), 2, 3)
    assert sampled["end_id"] == -1
    assert sampled["sampling_config"] == {"beam_width": 1, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 11}
    assert request_kwargs([5], SamplingParams(min_tokens=3, repetition_penalty=1.2), 2, 3)["sampling_config"] == {
        "beam_width": 1,
        "top_k": 1,
        "min_tokens": 3,
        "repetition_penalty": 1.2,
    }


class _History:
    def __init__(self, seen, tokens, eos_ids):
        self.seen, self.tokens, self.eos_ids = set(seen), list(tokens), frozenset(eos_ids)


def test_repetition_penalty_and_min_tokens_constrain_the_logits():
    logits = np.array([2.0, -1.0, 0.5, 3.0, -0.5], dtype=np.float32)
    p = SamplingParams(repetition_penalty=2.0, min_tokens=2)
    out = constrain(logits, p, _History(seen=[0, 1], tokens=[1], eos_ids=[3]))
    # seen tokens: positive logits divided, negative multiplied; eos masked before min_tokens
    assert out.tolist() == [1.0, -2.0, 0.5, -np.inf, -0.5]
    assert constrain(logits, p, _History([0, 1], [1, 0], [3]))[3] == 3.0  # min_tokens reached
    assert sample(logits[None], [p], [None], [_History([0, 1], [1], [3])]) == [0]  # 3 masked, 0 penalised to 1.0 > 0.5
    assert sample(logits[None], [SamplingParams()], [None], [_History([0], [], [3])]) == [3]


def test_min_tokens_also_defers_stop_strings(tokenizer):
    ids = tokenizer("alpha beta gamma delta").input_ids
    seq = Sequence(
        GenerationRequest([1], SamplingParams(max_new_tokens=20, stop=("beta",), min_tokens=len(ids))),
        None,
        tokenizer,
        frozenset({2}),
    )
    events = [seq.append(t) for t in ids]
    assert all(e.finish_reason is None for e in events) and "beta" in seq.text


def _hf_greedy(path, ids, eos, **kw) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False, **kw)[0, ids.shape[1] :].tolist()
    return out[:-1] if out[-1] in eos else out  # HF returns the end-of-sequence token, sq-deploy does not


def test_penalty_and_min_tokens_match_transformers_generate(tiny_models, tmp_path):
    """Greedy decoding with vLLM's repetition_penalty / min_tokens gives Hugging Face generate's tokens.

    For ``min_tokens`` the model's end-of-sequence set gets the 4th token it generates
    greedily, so that a plain request stops there and there is an end of sequence to hold back.
    """
    from sqdeploy.runtime import open_engine

    prompt = "def fibonacci(n):"
    engine = open_engine(tiny_models["llama"], "torch")
    try:
        ids = torch.tensor([encode_prompt(engine.tokenizer, prompt, 1 << 30)])
        plain = generate(engine, [prompt], SamplingParams(max_new_tokens=24))[0].token_ids
        got = generate(engine, [prompt], SamplingParams(max_new_tokens=24, repetition_penalty=1.5))[0].token_ids
        eos = sorted(engine.backend.info.eos_ids | {plain[3]})
    finally:
        engine.shutdown()
    assert got == _hf_greedy(tiny_models["llama"], ids, eos, repetition_penalty=1.5) and got != plain
    path = tmp_path / "m"
    shutil.copytree(tiny_models["llama"], path)
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((path / name).read_text())
        (path / name).write_text(json.dumps({**cfg, "eos_token_id": eos}))
    engine = open_engine(path, "torch")
    try:
        stopped = generate(engine, [prompt], SamplingParams(max_new_tokens=24))[0]
        got = generate(engine, [prompt], SamplingParams(max_new_tokens=24, min_tokens=12))[0].token_ids
    finally:
        engine.shutdown()
    assert stopped.token_ids == plain[:3] and stopped.finish_reason == "stop"
    assert len(got) >= 12 and got == _hf_greedy(path, ids, eos, min_new_tokens=12)
