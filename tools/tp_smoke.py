"""Tensor-parallel checks that fit a single-GPU machine (part of tools/gpu_bench.py).

Needs ``.carry/tp/{w8a8,w4}-tp{1,2}``: TensorRT-LLM checkpoints of a small random Llama
written on the CPU by ``sq-export --target trtllm --tp 1|2`` (the GPU machine cannot
install the exporter's dependencies). On one GPU it checks:

* tp 1 over NCCL (one process) against the in-process kernel model and against the
  checkpoint reader's float32 reference;
* tp 2 with both ranks on the one GPU over gloo (NCCL refuses two ranks on one GPU):
  the sharded kernels, the all-reduce after o/down and the vocabulary all-gather;
* tp 2 over NCCL is refused with a clear error (one GPU visible).
"""

from __future__ import annotations

from pathlib import Path

import torch

CARRY = Path(".carry/tp")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def _one(name: str) -> dict:
    from sqdeploy.formats.trtllm.reader import TrtllmCheckpoint
    from sqdeploy.kernels import greedy_generate
    from sqdeploy.model.loading import load_model
    from sqdeploy.runtime.tp import TPEngine, build_rank_model

    tp1, tp2 = CARRY / f"{name}-tp1", CARRY / f"{name}-tp2"
    ids = torch.randint(0, 8000, (2, 24), generator=torch.Generator().manual_seed(0))
    prompt = [ids[0, :8].tolist()]
    ck = TrtllmCheckpoint(tp1)
    with torch.no_grad():
        ref32 = load_model(ck, torch.float32, "cuda")(ids.cuda()).cpu()
        local = build_rank_model(ck, 0, torch.device("cuda"), torch.float16)
        l_local = local(ids.cuda()).cpu()
    g_local = greedy_generate(local, prompt, 16)
    out = {"in_process_vs_ref32": _rel(l_local, ref32)}
    with TPEngine(tp1, device="cuda") as eng:
        out["nccl_tp1_vs_in_process"] = _rel(eng.logits(ids), l_local)
        out["nccl_tp1_greedy_equal"] = eng.generate(prompt, 16) == g_local
    with TPEngine(tp2, device="cuda", backend="gloo") as eng:
        l2 = eng.logits(ids)
        out["gloo_tp2_on_one_gpu_vs_tp1"] = _rel(l2, l_local)
        out["gloo_tp2_vs_ref32"] = _rel(l2, ref32)
        out["gloo_tp2_greedy_equal"] = eng.generate(prompt, 16) == g_local
    return out


def run(model_dir: str, out_dir) -> dict:
    from sqdeploy.core.errors import SqDeployError
    from sqdeploy.runtime.tp import TPEngine

    res = {}
    for name in ("w8a8", "w4"):
        try:
            res[name] = _one(name)
        except Exception:  # noqa: BLE001 - reported
            import traceback

            res[name] = {"error": traceback.format_exc()[-1500:]}
            print(res[name]["error"], flush=True)
        print(f"   tp {name}: {res[name]}", flush=True)
    try:
        TPEngine(CARRY / "w8a8-tp2", device="cuda").close()
        res["nccl_tp2_on_one_gpu"] = "started (unexpected)"
    except SqDeployError as e:
        res["nccl_tp2_on_one_gpu"] = f"refused: {e}"
    return res
