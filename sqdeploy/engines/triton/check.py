"""Check a Triton model repository before a server ever sees it.

Per model: ``config.pbtxt`` parses as Triton's ModelConfig and names its directory;
no ``${...}`` template placeholder is left; Python models' ``model.py`` compiles;
``onnxruntime`` models declare exactly the graph's inputs and outputs (names, types,
dims); ``tensorrtllm`` models point at a directory with ``config.json`` and every
rank's engine. Ensembles: every step's model exists, each ``input_map`` key is an
input of the step model fed by an ensemble input or an earlier step's output of the
same type and shape, and each ensemble output is produced.
``python -m sqdeploy.engines.triton.check REPO`` prints the table; exit 1 on a failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.report import markdown_table
from sqdeploy.engines.triton.schema import parse_pbtxt


@dataclass(frozen=True)
class Finding:
    model: str
    check: str
    ok: bool
    detail: str = ""


def _dims(t) -> tuple[int, ...]:
    return tuple(t.dims)


def _compatible(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b))


def _io(tensors) -> dict:
    return {t.name: (t.data_type, _dims(t), getattr(t, "optional", False)) for t in tensors}


def _tensors(cfg) -> tuple[dict, dict]:
    return _io(cfg.input), _io(cfg.output)


def _check_onnx(name: str, cfg, version_dir: Path) -> list[Finding]:
    from sqdeploy.engines.triton.onnx_repo import TRITON_TYPES
    from sqdeploy.formats.onnx.contract import GRAPH, _spec

    path = version_dir / (cfg.default_model_filename or GRAPH)
    if not path.exists():
        return [Finding(name, "onnx graph", False, f"{path} is missing")]
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    from sqdeploy.engines.triton.schema import model_config_pb2

    types = model_config_pb2().DataType
    want = {s.name: (types.Value(TRITON_TYPES[s.dtype]), tuple(d if isinstance(d, int) and d > 0 else -1 for d in s.dims))
            for s in map(_spec, [*(v for v in graph.input if v.name not in inits), *graph.output])}
    inputs, outputs = _tensors(cfg)
    have = {k: v[:2] for k, v in {**inputs, **outputs}.items()}
    bad = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    return [Finding(name, "I/O matches the ONNX graph", not bad, ", ".join(bad[:4]))]


def _check_trtllm(name: str, cfg) -> list[Finding]:
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    engine = Path(params.get("gpt_model_path", ""))
    if not (engine / "config.json").exists():
        return [Finding(name, "engine directory", False, f"{engine} has no config.json (a path inside a container is checked there)")]
    world = json.loads((engine / "config.json").read_text()).get("pretrained_config", {}).get("mapping", {}).get("world_size", 1)
    missing = [f"rank{r}.engine" for r in range(int(world)) if not (engine / f"rank{r}.engine").exists()]
    return [Finding(name, "engine directory", not missing, ", ".join(missing) or f"{world} rank(s)")]


def _check_ensemble(name: str, cfg, configs: dict) -> list[Finding]:
    inputs, outputs = _tensors(cfg)
    available = {k: v[:2] for k, v in inputs.items()}
    out = []
    for step in cfg.ensemble_scheduling.step:
        m = configs.get(step.model_name)
        if m is None:
            out.append(Finding(name, f"step {step.model_name}", False, "model not in the repository"))
            continue
        s_in, s_out = _tensors(m)
        problems = []
        for key, value in step.input_map.items():
            if key not in s_in:
                problems.append(f"{key} is not an input of {step.model_name}")
            elif value not in available:
                problems.append(f"{value} is produced by no earlier step")
            elif available[value][0] != s_in[key][0] or not _compatible(available[value][1], s_in[key][1]):
                problems.append(f"{value} -> {key}: type/shape differ")
        required = [k for k, v in s_in.items() if not v[2] and k not in step.input_map]
        problems += [f"required input {k} is not mapped" for k in required]
        for key, value in step.output_map.items():
            if key not in s_out:
                problems.append(f"{key} is not an output of {step.model_name}")
            else:
                available[value] = s_out[key][:2]
        out.append(Finding(name, f"step {step.model_name}", not problems, "; ".join(problems)))
    for key, (dtype, dims, _) in outputs.items():
        ok = key in available and available[key][0] == dtype and _compatible(available[key][1], dims)
        out.append(Finding(name, f"output {key}", ok, "" if ok else "not produced with this type/shape"))
    return out


def check_repository(repo: str | Path) -> list[Finding]:
    repo = Path(repo)
    findings, configs, dirs = [], {}, {}
    for model_dir in sorted(p for p in repo.iterdir() if p.is_dir()):
        name, path = model_dir.name, model_dir / "config.pbtxt"
        if not path.exists():
            findings.append(Finding(name, "config.pbtxt", False, "missing"))
            continue
        text = path.read_text()
        try:
            cfg = parse_pbtxt(text, str(path))
        except SqDeployError as exc:  # the schema's own error message is the finding
            findings.append(Finding(name, "parses as ModelConfig", False, str(exc)[:200]))
            continue
        findings.append(Finding(name, "parses as ModelConfig", cfg.name == name, "" if cfg.name == name else f"name is {cfg.name!r}"))
        findings.append(Finding(name, "no template placeholders", "${" not in text, ""))
        configs[name], dirs[name] = cfg, model_dir
    for name, cfg in configs.items():
        version = dirs[name] / "1"
        if cfg.backend == "python":
            try:
                compile((version / "model.py").read_text(), str(version / "model.py"), "exec")
                findings.append(Finding(name, "model.py compiles", True))
            except (OSError, SyntaxError) as exc:
                findings.append(Finding(name, "model.py compiles", False, str(exc)))
        elif cfg.backend == "onnxruntime" or cfg.platform == "onnxruntime_onnx":
            findings += _check_onnx(name, cfg, version)
        elif cfg.backend == "tensorrtllm":
            findings += _check_trtllm(name, cfg)
        if cfg.platform == "ensemble":
            findings += _check_ensemble(name, cfg, configs)
    if not configs:
        findings.append(Finding(str(repo), "models", False, "no model directories"))
    caches = sorted(str(p.relative_to(repo)) for p in repo.rglob("__pycache__"))
    findings.append(Finding(str(repo), "no __pycache__", not caches, ", ".join(caches)))
    return findings


def report(findings: list[Finding]) -> str:
    return markdown_table(["model", "check", "result", "detail"], [[f.model, f.check, "ok" if f.ok else "FAIL", f.detail] for f in findings])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sqdeploy.engines.triton.check", description="Check a Triton model repository.")
    ap.add_argument("repo")
    args = ap.parse_args(argv)
    findings = check_repository(args.repo)
    print(report(findings))
    return 0 if all(f.ok for f in findings) else 1


if __name__ == "__main__":
    sys.exit(main())
