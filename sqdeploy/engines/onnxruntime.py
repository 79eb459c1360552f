"""ONNX Runtime engine directories: the graph optimised once, offline, for one provider.

ONNX Runtime optimises a graph every time a session is created; for an LLM that is
seconds of start-up and, on the CPU, hardware-specific layout changes. Building the
engine runs those optimisations once (``SessionOptions.optimized_model_filepath``)
for the chosen execution provider and saves the result with the session options a
server must use, so ``sq-serve`` creates its session with optimisations *off*.

``OUT/`` holds ``model.onnx`` (+ ``model.onnx.data``), ``session.json``,
``sqdeploy-onnx.json``, the tokenizer files and the export's ``config.json`` /
``genai_config.json`` (Optimum and ONNX Runtime GenAI open the engine as they open the export). ``session.json``::

    {"format": "sqdeploy.ort-engine", "model": "model.onnx",
     "execution_provider": "CPUExecutionProvider", "provider_options": {},
     "graph_optimization_level": "ORT_DISABLE_ALL",      # what to load it with
     "optimized_offline": {"level": "ORT_ENABLE_ALL", "chosen": "...",  # what was applied and why
                           "refused": [...], ...},
     "intra_op_num_threads": 0, "inter_op_num_threads": 0, "execution_mode": "sequential"}

Every optimised graph is run (a padded batch, then prefill + one decode step with the KV
cache) against the unoptimised source graph before it is kept. ONNX Runtime's fusions are
not all exact for every graph on every CPU (fused integer kernels round INT8 activations
their own way; some float16 fusions have been seen to break a graph outright), so without
``--opt-level`` the build tries the levels from the provider's highest down and keeps the
highest that passes; the refused ones are recorded with their measured difference. An
explicit ``--opt-level`` that fails verification fails the build.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sqdeploy.core.errors import MissingDependencyError, SqDeployError
from sqdeploy.core.report import markdown_table
from sqdeploy.formats.onnx.contract import ENGINE_FORMAT, GRAPH, META, SESSION, OnnxExport

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
LEVELS = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC", "disable": "ORT_DISABLE_ALL"}
# CPU-only layout rewrites (ORT_ENABLE_ALL) do not apply to CUDA; extended is its highest useful level
DEFAULT_LEVEL = {"cpu": "all", "cuda": "extended"}
ORDER = ("all", "extended", "basic", "disable")  # highest first: the fallback order
MODES = {"sequential": "ORT_SEQUENTIAL", "parallel": "ORT_PARALLEL"}  # session.json value -> ExecutionMode
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}


@dataclass(frozen=True)
class OrtOptions:
    provider: str = "cpu"
    opt_level: str | None = None
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    execution_mode: str = "sequential"
    provider_options: dict[str, str] = field(default_factory=dict)

    @property
    def level(self) -> str:
        """The level tried first: the requested one, else the provider's highest."""
        return self.opt_level or DEFAULT_LEVEL[self.provider]

    @property
    def candidates(self) -> tuple[str, ...]:
        """Levels to try in order: only the requested one, else every level from the highest down."""
        if self.opt_level:
            return (self.opt_level,)
        return ORDER[ORDER.index(DEFAULT_LEVEL[self.provider]):]


@dataclass(frozen=True)
class OrtPlan:
    src: OnnxExport
    out: Path
    options: OrtOptions

    def session_json(self, level: str | None = None) -> dict[str, Any]:
        o = self.options
        return {
            "format": ENGINE_FORMAT, "format_version": 1, "model": GRAPH,
            "execution_provider": PROVIDERS[o.provider], "provider_options": dict(o.provider_options),
            "graph_optimization_level": "ORT_DISABLE_ALL",
            "optimized_offline": {"level": LEVELS[level or o.level], "provider": PROVIDERS[o.provider],
                                  "onnxruntime": _ort_version()},
            "intra_op_num_threads": o.intra_op_threads, "inter_op_num_threads": o.inter_op_threads,
            "execution_mode": o.execution_mode, "source": str(self.src.path.resolve()),
        }

    def summary(self) -> str:
        s = self.src.describe()
        rows = [
            ["source", s["path"]], ["variant / dtype", f"{s['variant']} / {s['dtype']}"],
            ["weights", f"{s['weights_bytes'] / 2**20:.1f} MiB"], ["quantize ops", s["quantize_ops"] or "none"],
            ["execution provider", PROVIDERS[self.options.provider]], ["offline optimisation", self.level_text()],
            ["threads (intra / inter)", f"{self.options.intra_op_threads} / {self.options.inter_op_threads} (0 = all cores)"],
            ["output", str(self.out)],
        ]
        return "ONNX Runtime engine plan\n" + markdown_table(["", ""], rows)

    def level_text(self) -> str:
        if self.options.opt_level:
            return LEVELS[self.options.opt_level]
        return f"the highest that passes verification of {', '.join(LEVELS[c] for c in self.options.candidates)}"


def _ort_version() -> str | None:
    try:
        import onnxruntime

        return onnxruntime.__version__
    except ImportError:
        return None


def plan_ort(src_dir: str | Path, out: str | Path, options: OrtOptions) -> OrtPlan:
    if options.provider not in PROVIDERS:
        raise SqDeployError(f"unknown provider '{options.provider}'; choose {', '.join(PROVIDERS)}")
    if options.level not in LEVELS:
        raise SqDeployError(f"unknown optimisation level '{options.level}'; choose {', '.join(LEVELS)}")
    if options.execution_mode not in MODES:
        raise SqDeployError(f"unknown execution mode '{options.execution_mode}'; choose {', '.join(MODES)}")
    src = OnnxExport(src_dir)
    if not src.tokenizer_files():
        raise SqDeployError(f"{src.path} has no tokenizer files (tokenizer.json ...); re-export the model, which copies them")
    return OrtPlan(src, Path(out), options)


def _require_provider(provider: str) -> None:
    try:
        import onnxruntime as ort
    except ImportError:
        raise MissingDependencyError("onnxruntime", "building an ONNX Runtime engine") from None
    if PROVIDERS[provider] not in ort.get_available_providers():
        raise MissingDependencyError(
            "onnxruntime-gpu", f"an ONNX Runtime engine for {PROVIDERS[provider]}",
            "pip install onnxruntime-gpu (in place of onnxruntime) on a machine with a CUDA GPU",
        )


def session_options(session: dict[str, Any], level: str | None = None):
    """``onnxruntime.SessionOptions`` from a ``session.json`` (``level`` overrides its level)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level or session["graph_optimization_level"])
    so.intra_op_num_threads = int(session.get("intra_op_num_threads", 0))
    so.inter_op_num_threads = int(session.get("inter_op_num_threads", 0))
    so.execution_mode = getattr(ort.ExecutionMode, MODES[session.get("execution_mode", "sequential")])
    return so


def load_engine_session(engine_dir: str | Path):
    """An InferenceSession over an engine directory, exactly as ``session.json`` says."""
    import onnxruntime as ort

    d = Path(engine_dir)
    session = json.loads((d / SESSION).read_text())
    providers = [(session["execution_provider"], session.get("provider_options") or {})]
    return ort.InferenceSession(str(d / session["model"]), session_options(session), providers=providers)


def build_ort(plan: OrtPlan, tmp: Path) -> dict[str, Any]:
    """Optimise offline into ``tmp`` (an empty directory), verify, and return the report.

    Each candidate level (:attr:`OrtOptions.candidates`) is optimised and verified in turn
    until one passes; a refused level's graph is removed before the next is written. One
    session at a time (reference, optimiser, engine), so peak memory stays at one copy of
    the weights.
    """
    import onnxruntime as ort

    from sqdeploy.core.progress import Progress

    _require_provider(plan.options.provider)
    candidates = plan.options.candidates
    base = plan.session_json()
    providers = [(base["execution_provider"], base["provider_options"])]
    ids, mask = _probe(plan.src)
    bar = Progress(1 + 2 * len(candidates), "onnxruntime engine", enabled=True)  # one line a step when not on a terminal
    bar.update("running the source graph")
    reference = ort.InferenceSession(str(plan.src.graph_path), session_options(base), providers=providers)
    expected = _run(reference, plan.src, ids, mask, None)["logits"]
    del reference
    bar.advance()
    shutil.copy(plan.src.path / META, tmp / META)
    for f in plan.src.tokenizer_files() + plan.src.companion_files():  # same signature: Optimum and GenAI load it too
        shutil.copy(f, tmp / f.name)
    refused: list[dict[str, Any]] = []
    for level in candidates:
        session = plan.session_json(level)
        bar.update(f"optimising ({LEVELS[level]})")
        optimize_s = _optimise(plan, session, level, tmp, providers)
        bar.advance()
        bar.update(f"verifying the engine ({LEVELS[level]})")
        check = verify_engine(load_engine_session(tmp), plan.src, ids, mask, expected)
        ok = check.pop("ok")
        bar.advance()
        if ok:
            break
        refused.append({"level": LEVELS[level], **check})
        for f in (GRAPH, f"{GRAPH}.data", SESSION):
            (tmp / f).unlink(missing_ok=True)  # written by this attempt
    bar.close()
    if not ok:
        raise SqDeployError(_refusal(refused, explicit=plan.options.opt_level is not None))
    session["optimized_offline"]["chosen"] = (
        "requested with --opt-level" if plan.options.opt_level
        else "the highest level whose engine matched the source graph" if not refused
        else "the highest level whose engine matched the source graph (higher levels refused, see refused)")
    session["optimized_offline"]["refused"] = refused
    session["optimized_offline"]["verification"] = check
    (tmp / SESSION).write_text(json.dumps(session, indent=2) + "\n")
    return {"engine": "onnxruntime", "session": session, "optimize_seconds": round(optimize_s, 2),
            "nodes_before": sum(plan.src.op_counts.values()), "nodes_after": sum(OnnxExport(tmp).op_counts.values()),
            "verification": check, "level": LEVELS[level], "refused": refused}


def _optimise(plan: OrtPlan, session: dict[str, Any], level: str, tmp: Path, providers) -> float:
    """Write the graph optimised at ``level`` and its ``session.json`` into ``tmp``; returns the seconds taken."""
    import onnxruntime as ort

    t0 = time.perf_counter()
    so = session_options(session, level=LEVELS[level])
    so.optimized_model_filepath = str(tmp / GRAPH)
    if plan.src.external_data or plan.src.initializer_bytes > (1 << 30):
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{GRAPH}.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(plan.src.graph_path), so, providers=providers)
    (tmp / SESSION).write_text(json.dumps(session, indent=2) + "\n")
    return time.perf_counter() - t0


def _refusal(refused: list[dict[str, Any]], explicit: bool) -> str:
    tried = "; ".join(f"{r['level']}: {r['max_rel_diff_vs_source']:.2e} vs the source, {r['max_rel_diff_decode_vs_full']:.2e} "
                      f"decode vs full pass" for r in refused)
    tol = refused[-1]["tolerance"]
    if explicit:
        return (f"the optimised engine disagrees with its source graph (relative logits difference {tried}; tolerance "
                f"{tol:.0e}); leave out --opt-level to use the highest level that passes, or pass a lower one")
    return (f"no optimisation level gives an engine that agrees with its source graph (relative logits difference {tried}; "
            f"tolerance {tol:.0e}): the export itself is inconsistent (check it with sq-check onnx)")


def _feeds(src: OnnxExport, ids: np.ndarray, mask: np.ndarray, past: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Inputs for one step: positions count only unmasked tokens (left padding)."""
    b, s = ids.shape
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, -s:]
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions.astype(np.int64)}
    kv = src.input("past_key_values.0.key")
    dtype = np.dtype(kv.dtype)
    for i in range(src.num_layers):
        for part in ("key", "value"):
            name = f"past_key_values.{i}.{part}"
            feeds[name] = past[f"present.{i}.{part}"] if past else np.zeros((b, kv.dims[1], 0, kv.dims[3]), dtype)
    return feeds


def _probe(src: OnnxExport) -> tuple[np.ndarray, np.ndarray]:
    """Two rows of six tokens; the second is left-padded by two (every last position is a real token)."""
    ids = (np.arange(12, dtype=np.int64).reshape(2, 6) * 37 + 3) % int(src.meta["vocab_size"])
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    return ids, mask


def _run(session, src: OnnxExport, ids, mask, past) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, _feeds(src, ids, mask, past))))


def verify_engine(engine, src: OnnxExport, ids, mask, expected: np.ndarray) -> dict[str, Any]:
    """Engine vs the unoptimised source logits, and prefill + decode vs one full pass (``ok``: both within tolerance).

    Only unpadded positions count: the logits of a padding position are unspecified (no token
    attends to it and no caller reads them), and fusions may compute them differently."""
    full = _run(engine, src, ids, mask, None)
    pre = _run(engine, src, ids[:, :-1], mask[:, :-1], None)
    dec = _run(engine, src, ids[:, -1:], mask, pre)
    real = mask.astype(bool)
    scale = float(np.abs(expected[real]).max()) or 1.0
    vs_source = float(np.abs(full["logits"][real].astype(np.float64) - expected[real]).max()) / scale
    kv_cache = float(np.abs(dec["logits"][:, -1].astype(np.float64) - full["logits"][:, -1]).max()) / scale
    tol = TOLERANCE.get(src.dtype, 2e-2)
    return {"max_rel_diff_vs_source": vs_source, "max_rel_diff_decode_vs_full": kv_cache, "tolerance": tol,
            "ok": vs_source <= tol and kv_cache <= tol}
