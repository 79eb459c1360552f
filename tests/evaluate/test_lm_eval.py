"""lm-eval harness through sq-eval, on a local multiple-choice task (no hub access).

The task's answers are chosen from the model's own log-likelihoods (computed here with the
reference decoder), so the harness must report accuracy 1 for the "preferred" task and 0
for the "dispreferred" one: any mismatch in how the adapter scores continuations fails.
"""

import json

import pytest
import torch

from sqdeploy.cli.eval import main as eval_main
from sqdeploy.model import HFCheckpoint, load_model
from sqdeploy.quantize.pipeline import load_tokenizer
from tests.conftest import HELDOUT

pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install 'sq-deploy[lm-eval]'")

QUESTIONS = [
    ("def add(a, b):\n    return", [" a + b", " a - b", " None"]),
    ("for i in range(10):\n   ", [" print(i)", " break", " pass"]),
    ("import", [" os", " numpy as np", " sys"]),
    ("class Foo:\n    def", [" __init__(self):", " run(self):", " x"]),
]

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
target_delimiter: ""
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def _loglik(model, tok, context: str, cont: str) -> float:
    ctx, cnt = tok(context, add_special_tokens=False).input_ids, tok(cont, add_special_tokens=False).input_ids
    ids = torch.tensor([ctx + cnt])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[:, :-1])[0, -len(cnt):], -1)
    return float(logp.gather(1, ids[0, -len(cnt):, None]).sum())


def test_lm_eval_scores_continuations_like_the_model(tiny_models, tmp_path):
    path = tiny_models["llama"]
    tok, model = load_tokenizer(path), load_model(HFCheckpoint(path)).eval()
    for name, pick in (("sqd_pref", max), ("sqd_dispref", min)):
        rows = []
        for q, choices in QUESTIONS:
            scores = [_loglik(model, tok, q, c) for c in choices]
            rows.append({"question": q, "choices": choices, "answer": scores.index(pick(scores))})
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp_path / f"{name}.yaml").write_text(TASK.format(name=name, data=data))
    out = tmp_path / "eval.json"
    assert eval_main([str(path), "--text", str(HELDOUT), "--windows", "1", "--seq-len", "64",
                      "--lm-eval", "sqd_pref,sqd_dispref", "--lm-eval-include", str(tmp_path), "--json", str(out)]) == 0
    res = json.loads(out.read_text())["results"][0]["lm_eval"]
    assert res["sqd_pref"]["acc,none"] == 1.0
    assert res["sqd_dispref"]["acc,none"] == 0.0
