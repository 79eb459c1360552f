"""EleutherAI lm-evaluation-harness on any sq-deploy model (``sq-eval --lm-eval TASKS``).

The harness only needs log-likelihoods (and, for generation tasks, greedy text), so one
adapter over a ``logits_fn`` serves the reference model, ONNX Runtime sessions and
checkpoint readers alike: whatever ``sq-eval`` can score for perplexity, it can run
lm-eval tasks on, with the same quantization arithmetic.
"""

from __future__ import annotations

import torch

from sqdeploy.core.errors import MissingDependencyError, SqDeployError
from sqdeploy.evaluate.perplexity import LogitsFn


def _adapter_class():
    try:
        from lm_eval.api.model import LM
    except ImportError:
        raise MissingDependencyError("lm-eval", "--lm-eval", "pip install 'sq-deploy[lm-eval]'") from None

    class SqDeployLM(LM):
        def __init__(self, logits_fn: LogitsFn, tokenizer, max_length: int, max_gen_tokens: int = 256):
            super().__init__()
            self.logits_fn, self.tok = logits_fn, tokenizer
            self.max_length, self.max_gen_tokens = max_length, max_gen_tokens

        def _encode(self, text: str) -> list[int]:
            return self.tok(text, add_special_tokens=False).input_ids

        def _score(self, ctx_ids: list[int], cont_ids: list[int]) -> tuple[float, bool]:
            ids = (ctx_ids + cont_ids)[-(self.max_length + 1) :]
            logits = self.logits_fn(torch.tensor([ids[:-1]]))[0].float()
            logp = torch.log_softmax(logits[-len(cont_ids) :], dim=-1)
            target = torch.tensor(ids[-len(cont_ids) :])
            return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())

        def loglikelihood(self, requests):
            out = []
            for req in requests:
                context, continuation = req.args
                ctx = self._encode(context) or [self.tok.eos_token_id]
                out.append(self._score(ctx, self._encode(continuation)))
            return out

        def loglikelihood_rolling(self, requests):
            out = []
            for req in requests:
                ids = [self.tok.eos_token_id] + self._encode(req.args[0])
                total = 0.0
                for start in range(1, len(ids), self.max_length):
                    ctx = ids[max(0, start - self.max_length) : start]
                    total += self._score(ctx, ids[start : start + self.max_length])[0]
                out.append(total)
            return out

        def generate_until(self, requests):
            out = []
            for req in requests:
                context, kwargs = req.args
                until = kwargs.get("until") or []
                ids = self._encode(context)
                gen: list[int] = []
                for _ in range(kwargs.get("max_gen_toks", self.max_gen_tokens)):
                    logits = self.logits_fn(torch.tensor([(ids + gen)[-self.max_length :]]))[0, -1]
                    nxt = int(logits.argmax())
                    if nxt == self.tok.eos_token_id:
                        break
                    gen.append(nxt)
                    text = self.tok.decode(gen)
                    if any(u in text for u in until):
                        break
                text = self.tok.decode(gen)
                for u in until:
                    text = text.split(u)[0]
                out.append(text)
            return out

    return SqDeployLM


def run_lm_eval(
    logits_fn: LogitsFn, tokenizer, tasks: list[str], max_length: int, limit: int | None = None, include: str | None = None
) -> dict:
    """Run lm-eval ``tasks``; returns the harness's per-task metrics.

    ``include`` is a directory of task YAML files (lm-eval's ``--include_path``): the way to
    run tasks whose data are local files when the hub is out of reach.
    """
    adapter = _adapter_class()(logits_fn, tokenizer, max_length)
    import lm_eval
    from lm_eval.tasks import TaskManager

    try:
        manager = TaskManager(include_path=include) if include else None
        results = lm_eval.simple_evaluate(model=adapter, tasks=tasks, limit=limit, task_manager=manager,
                                          bootstrap_iters=0, log_samples=False)
    except Exception as exc:  # task lookup or dataset download failures
        raise SqDeployError(f"lm-eval could not run {tasks} ({type(exc).__name__}: {exc}); offline, task data must be cached "
                            "locally or given as local files through --lm-eval-include") from None
    return results["results"]
