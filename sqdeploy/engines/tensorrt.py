"""TensorRT engines from an ONNX export, through TensorRT's Python API.

Precision follows the graph (**explicit quantization**): an fp16 graph runs in fp16,
and INT8/INT4 run exactly where the graph has QuantizeLinear/DequantizeLinear pairs.
TensorRT wants such graphs built as *strongly typed* networks, with no precision
flags (its "Explicit Quantization" guide); that is the default here. ``--precision
fp16`` instead builds an fp32 export weakly typed with the FP16 flag (and INT8 when the
graph has INT8 Q/DQ), which only TensorRT 10 offers.

Two optimisation profiles cover an LLM's two phases, with ranges derived from the
graph's dynamic axes (batch, sequence, past_sequence, past_sequence + sequence):

* ``context`` (profile 0): prompts of 1..max_input_len tokens, no past;
* ``decode`` (profile 1): one new token with a past of 1..max_seq_len-1 tokens.

``OUT/`` holds ``model.plan``, ``engine.json`` (the plan: profiles in order, I/O),
``sqdeploy-onnx.json`` and the tokenizer files.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqdeploy.core.errors import MissingDependencyError, SqDeployError
from sqdeploy.core.report import markdown_table
from sqdeploy.engines.gpus import GIB, GpuProfile, check_visible_gpus
from sqdeploy.engines.planner import gib
from sqdeploy.formats.onnx.contract import BATCH, META, PAST, SEQUENCE, TOTAL, OnnxExport

PLAN_FILE = "model.plan"
ENGINE_JSON = "engine.json"
PRECISIONS = ("graph", "fp16")


@dataclass(frozen=True)
class TrtOptions:
    gpu: GpuProfile
    max_batch_size: int = 8
    max_seq_len: int | None = None  # None: min(4096, the model's max positions)
    max_input_len: int | None = None  # None: half of max_seq_len, at most 2048
    precision: str = "graph"
    workspace_gib: float = 4.0
    optimization_level: int = 3
    reserve_bytes: int = GIB


@dataclass(frozen=True)
class Profile:
    name: str
    ranges: dict[str, tuple[int, int, int]]  # role -> (min, opt, max)
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)


@dataclass(frozen=True)
class TrtPlan:
    src: OnnxExport
    out: Path
    options: TrtOptions
    strongly_typed: bool
    flags: tuple[str, ...]
    profiles: tuple[Profile, ...]
    memory: dict[str, int]
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": str(self.src.path), "gpu": self.options.gpu.name, "strongly_typed": self.strongly_typed,
            "builder_flags": list(self.flags), "workspace_bytes": int(self.options.workspace_gib * GIB),
            "builder_optimization_level": self.options.optimization_level,
            "profiles": [{"name": p.name, "ranges": p.ranges, "shapes": {k: [list(x) for x in v] for k, v in p.shapes.items()}}
                         for p in self.profiles],
            "memory": self.memory, "notes": list(self.notes),
            "inputs": [asdict(s) for s in self.src.inputs], "outputs": [asdict(s) for s in self.src.outputs],
        }

    def summary(self) -> str:
        typing = "strongly typed (precision from the graph)" if self.strongly_typed else "weakly typed"
        rows = [["source", f"{self.src.path} ({self.src.variant}, {self.src.dtype})"],
                ["quantize ops", self.src.quantize_ops() or "none"], ["network", typing],
                ["builder flags", ", ".join(self.flags) or "none"], ["GPU", self.options.gpu.name]]
        for p in self.profiles:
            rows.append([f"profile {p.name}", ", ".join(f"{k} {lo}..{hi} (opt {opt})" for k, (lo, opt, hi) in p.ranges.items())])
        m = self.memory
        memory = f"weights {gib(m['weights'])} + KV cache {gib(m['kv_cache'])} + workspace {gib(m['workspace'])} of {gib(m['gpu'])}"
        rows.append(["memory per GPU", memory])
        notes = "".join(f"\nnote: {n}" for n in self.notes)
        return "TensorRT engine plan\n" + markdown_table(["", ""], rows) + notes


def _role_ranges(batch: int, max_in: int, max_seq: int) -> tuple[Profile, Profile]:
    b = (1, max(1, batch // 2), batch)
    context = Profile("context", {BATCH: b, SEQUENCE: (1, max(1, max_in // 2), max_in), PAST: (0, 0, 0),
                                  TOTAL: (1, max(1, max_in // 2), max_in)})
    opt_past = max(1, max_seq // 2)
    decode = Profile("decode", {BATCH: b, SEQUENCE: (1, 1, 1), PAST: (1, opt_past, max_seq - 1),
                                TOTAL: (2, opt_past + 1, max_seq)})
    return context, decode


def _shapes(src: OnnxExport, profile: Profile, notes: list[str]) -> Profile:
    """Per-input (min, opt, max) shapes: fixed axes keep their size, dynamic ones take their role's range."""
    shapes = {}
    for spec in src.inputs:
        lo, opt, hi = [], [], []
        for dim, role in zip(spec.dims, spec.roles()):
            if isinstance(dim, int) and dim > 0:
                if isinstance(role, str) and not (profile.ranges[role][0] <= dim <= profile.ranges[role][2]):
                    notes.append(f"{spec.name}: axis '{role}' is fixed to {dim} in the graph, outside the {profile.name} range")
                lo.append(dim), opt.append(dim), hi.append(dim)
            else:
                r = profile.ranges[role] if isinstance(role, str) else (role, role, role)
                lo.append(r[0]), opt.append(r[1]), hi.append(r[2])
        shapes[spec.name] = (tuple(lo), tuple(opt), tuple(hi))
    return Profile(profile.name, profile.ranges, shapes)


def _check_axis_names(src: OnnxExport) -> None:
    """One symbolic name per role, used consistently: a graph that mixes them was not exported by sq-deploy."""
    seen: dict[str, str] = {}
    for spec in src.inputs + src.outputs:
        for dim, role in zip(spec.dims, spec.roles()):
            if isinstance(dim, str) and isinstance(role, str) and seen.setdefault(dim, role) != role:
                raise SqDeployError(f"{src.graph_path}: axis '{dim}' is used as both {seen[dim]} and {role}; re-export the model")


def plan_trt(src_dir: str | Path, out: str | Path, options: TrtOptions) -> TrtPlan:
    src = OnnxExport(src_dir)
    if options.precision not in PRECISIONS:
        raise SqDeployError(f"unknown precision '{options.precision}'; choose {', '.join(PRECISIONS)}")
    foreign = src.nonstandard_ops()
    if foreign:
        raise SqDeployError(
            f"{src.graph_path} uses ONNX Runtime contrib ops TensorRT cannot parse ({', '.join(foreign[:3])}); "
            "export the TensorRT variant (standard ONNX ops only), or build --engine onnxruntime"
        )
    if not src.tokenizer_files():
        raise SqDeployError(f"{src.path} has no tokenizer files; re-export the model, which copies them")
    _check_axis_names(src)
    max_pos = int(src.meta.get("max_positions") or 4096)
    max_seq = options.max_seq_len or min(4096, max_pos)
    max_in = options.max_input_len or max(1, min(2048, max_seq // 2))
    if max_seq > max_pos or max_in > max_seq or max_seq < 2:
        raise SqDeployError(f"need 1 <= max_input_len ({max_in}) <= max_seq_len ({max_seq}) <= the model's {max_pos} positions")
    notes: list[str] = []
    profiles = tuple(_shapes(src, p, notes) for p in _role_ranges(options.max_batch_size, max_in, max_seq))
    qdq = src.quantize_ops()
    if options.precision == "graph":
        strongly_typed, flags = True, ()
        if src.dtype == "float32" and not qdq:
            notes.append("the graph is float32, so the engine computes in fp32; export fp16 or pass --precision fp16")
    else:
        if src.dtype != "float32":
            raise SqDeployError(f"--precision fp16 is for float32 exports; this graph is {src.dtype}: build with --precision graph")
        strongly_typed, flags = False, ("FP16", "INT8") if qdq else ("FP16",)
    memory = _memory(src, options, max_seq)
    return TrtPlan(src, Path(out), options, strongly_typed, flags, profiles, memory, tuple(notes))


def _memory(src: OnnxExport, options: TrtOptions, max_seq: int) -> dict[str, int]:
    m = {"weights": src.initializer_bytes, "kv_cache": src.kv_bytes_per_token() * max_seq * options.max_batch_size,
         "workspace": int(options.workspace_gib * GIB), "reserve": options.reserve_bytes, "gpu": options.gpu.memory_bytes}
    need = m["weights"] + m["kv_cache"] + m["workspace"] + m["reserve"]
    if need > m["gpu"]:
        raise SqDeployError(
            f"the engine does not fit one {options.gpu.name}: weights {gib(m['weights'])} + KV cache {gib(m['kv_cache'])} "
            f"({options.max_batch_size} x {max_seq} tokens) + workspace {gib(m['workspace'])} + reserve {gib(m['reserve'])} = "
            f"{gib(need)} > {gib(m['gpu'])}; lower --max-batch-size or --max-seq-len, or use a lower-bit export"
        )
    return m


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingDependencyError("tensorrt", "building a TensorRT engine", "pip install 'sq-deploy[tensorrt]' on a machine with an NVIDIA GPU") from None
    major = int(trt.__version__.split(".")[0])
    if major < 10:
        raise SqDeployError(f"TensorRT {trt.__version__} is too old for INT4/strongly typed builds; pip install 'tensorrt>=10'")
    return trt, major


def build_trt(plan: TrtPlan, tmp: Path) -> dict[str, Any]:
    """Parse, configure and build; write the engine and its plan into ``tmp``."""
    trt, major = _import_tensorrt()
    if not plan.strongly_typed and major >= 11:
        raise SqDeployError(f"TensorRT {trt.__version__} builds strongly typed networks only; export fp16 and use --precision graph")
    check_visible_gpus(1, plan.options.gpu, "building a TensorRT engine")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(plan.src.graph_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SqDeployError(f"TensorRT could not parse {plan.src.graph_path}: {errors[:500]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(plan.options.workspace_gib * GIB))
    config.builder_optimization_level = plan.options.optimization_level
    for flag in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for prof in plan.profiles:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in prof.shapes.items():
            p.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(p)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise SqDeployError("TensorRT failed to build the engine (see its log above); try a smaller --max-batch-size or --workspace-gib")
    (tmp / PLAN_FILE).write_bytes(bytes(serialized))
    record = {"format": "sqdeploy.tensorrt-engine", "tensorrt": trt.__version__, **plan.to_dict()}
    (tmp / ENGINE_JSON).write_text(json.dumps(record, indent=2) + "\n")
    shutil.copy(plan.src.path / META, tmp / META)
    for f in plan.src.tokenizer_files():
        shutil.copy(f, tmp / f.name)
    return {"engine": "tensorrt", "tensorrt": trt.__version__, "plan_bytes": (tmp / PLAN_FILE).stat().st_size}
