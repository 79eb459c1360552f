"""Export speed and memory at 7B/13B scale on one GPU, in one call of a few minutes.

Makes Llama checkpoints of 7B and 13B shape with random float16 weights on the local disk
(one safetensors shard per layer, written as it is drawn: never the whole model in memory;
shallower models hard-link the shards of deeper ones), writes a JSONL of random-word
calibration prompts (or takes ``--calib``), then runs ``sq-export`` for each planned export in
its own child process and records:

* wall time, user and system CPU, minor and major page faults (``wait4`` on the child);
* peak host RSS: the child's own ``VmHWM`` at exit (``ru_maxrss`` is kept too, but a child's
  starts at the parent's high-water mark, which fork and exec carry over), and VmRSS sampled
  every 0.2 s as a curve (the peak of an export killed at its timeout);
* peak GPU memory (``torch.cuda.max_memory_allocated`` / ``reserved``) and seconds per phase,
  from the record ``sq-export`` writes with ``SQDEPLOY_PHASES_JSON`` set
  (:mod:`sqdeploy.core.phases`);
* the per-layer times of the progress lines, the output size, and any error.

The plan runs in priority order until ``--budget`` seconds are used: every recipe on a 7B
shape of ``--layers`` layers (TensorRT-LLM at ``--tp``), the first recipe again at
``--depth-layers`` (two depths give the per-layer constants), the 13B shape, the ONNX export,
then the full-depth 7B export when the time measured so far says it fits, then the other
recipes on 13B. Each export may take ``--export-timeout`` seconds (and no more than is left of
the budget); one stopped early still reports its per-layer times and memory curve. From the
per-layer constants the report extrapolates time, host RSS and GPU memory to a 70B shape
(80 layers). Outputs in ``--out``: ``bench-export-gpu.json``,
``bench-export-gpu.md``, ``bench-export-gpu.png`` (when matplotlib is installed) and
``bench-export-gpu.log`` (every export's output); a summary table is printed at the end.

    python tools/bench_export_gpu.py --out $OUT            # at most about 7.5 minutes
    python tools/bench_export_gpu.py --out OUT --device cpu --shapes small --layers 2 --depth-layers 3 --budget 300
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RECIPES = ("w8a8-sq", "w8a8-sq-pertoken", "w4a16-awq", "w4a16-sqplus")
MODELOPT = ("modelopt-int8-sq", "modelopt-int4-awq")  # tools/bench_export.py's ModelOpt configurations
RTN_SQ = "w8a8-sq:rounding=rtn:gptq_act_order=false"  # the searched SmoothQuant with round-to-nearest: what ModelOpt's INT8 SmoothQuant does
VS_MODELOPT = ((RTN_SQ, "modelopt-int8-sq", 2.0), ("w8a8-sq", "modelopt-int8-sq", None),
               ("w4a16-awq", "modelopt-int4-awq", 1.0), ("w4a16-sqplus", "modelopt-int4-awq", 1.0))
NEEDED = ("torch", "safetensors", "tokenizers", "transformers", "compressed_tensors", "yaml", "tqdm", "onnx")
MIN_START_S = 25.0  # an export is not started with less time than this left
KILL_GRACE_S = 15.0
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {msg}", flush=True)


@dataclass
class Job:
    shape: str
    layers: int
    recipe: str
    target: str  # trtllm | onnx
    role: str  # "recipes", "onnx", "depth", "13b", "full", "eager-gptq"
    estimate_gate: bool = False  # start only when the measured per-layer time says it fits
    env: tuple[tuple[str, str], ...] = ()  # extra environment of the export

    @property
    def name(self) -> str:
        return f"{self.shape}-L{self.layers}-{self.recipe}-{self.target}" + ("-eager-gptq" if self.role == "eager-gptq" else "")


@dataclass
class Result:
    job: dict
    status: str = "skipped"  # ok | error | timeout | skipped
    note: str = ""
    wall_s: float | None = None
    user_s: float | None = None
    sys_s: float | None = None
    minor_faults: int | None = None
    major_faults: int | None = None
    peak_rss_mib: float | None = None
    ru_maxrss_mib: float | None = None  # includes the benchmark's own RSS at fork time
    rss_curve: list = field(default_factory=list)  # [seconds, MiB, layers done]
    gpu_max_allocated_mib: float | None = None
    gpu_max_reserved_mib: float | None = None
    nvml_peak_mib: float | None = None
    phases: dict = field(default_factory=dict)
    layer_seconds: list = field(default_factory=list)
    output_mib: float | None = None
    checkpoint_mib: float | None = None
    returncode: int | None = None
    tail: list = field(default_factory=list)
    tensors_sha256: str | None = None  # every tensor of the output's safetensors files, by name


# ---------------------------------------------------------------- checkpoints

class Models:
    """Random checkpoints per shape: one base directory grown layer by layer, and hard-linked depths."""

    def __init__(self, work: Path, device: str, seed: int = 0):
        self.work, self.device, self.seed = work, device, seed
        self.made: dict[tuple[str, int], Path] = {}
        self.seconds: dict[str, float] = {}
        self.written = [0, 0.0]  # bytes drawn and written, seconds: the rate estimates a deeper model's cost

    def layers_made(self, shape: str) -> int:
        cfg = self.work / f"{shape}-base" / "config.json"
        return json.loads(cfg.read_text())["num_hidden_layers"] if cfg.exists() else 0

    def seconds_to_make(self, shape: str, layers: int) -> float:
        from sqdeploy.testing.random_checkpoint import SHAPES, checkpoint_bytes

        have = self.layers_made(shape)
        if layers <= have:
            return 0.0
        extra = checkpoint_bytes(SHAPES[shape], layers) - checkpoint_bytes(SHAPES[shape], have)
        rate = self.written[0] / self.written[1] if self.written[1] > 0 else 0.5 * 2**30
        return extra / rate

    def get(self, shape: str, layers: int) -> Path:
        from sqdeploy.testing.random_checkpoint import SHAPES, with_layers

        key = (shape, layers)
        if key in self.made:
            return self.made[key]
        hf = dict(SHAPES[shape])
        base = self.work / f"{shape}-base"
        t0 = time.perf_counter()
        have = self.layers_made(shape)
        if have < layers:
            # the base grows: layer i is drawn from its own seed, so a deeper base keeps the shallower one's layers
            from sqdeploy.testing.random_checkpoint import checkpoint_bytes

            _grow(base, hf, have, layers, self.seed, self.device)
            if self.device == "cuda":
                import torch

                torch.cuda.empty_cache()  # the exports get the GPU memory the drawing used
            self.written[0] += checkpoint_bytes(hf, layers) - (checkpoint_bytes(hf, have) if have else 0)
            self.written[1] += time.perf_counter() - t0
        path = self.work / f"{shape}-L{layers}"
        with_layers(base, path, layers)
        self.seconds[f"{shape}-L{layers}"] = round(time.perf_counter() - t0, 2)
        log(f"checkpoint {path.name}: {_du(path) / 2**30:.2f} GiB in {time.perf_counter() - t0:.1f} s")
        self.made[key] = path
        return path


def _grow(base: Path, hf: dict, have: int, layers: int, seed: int, device: str) -> None:
    from sqdeploy.testing.random_checkpoint import extend_random_llama

    extend_random_llama(base, hf, have, layers, seed, device)


def _du(path: Path) -> int:
    seen, total = set(), 0
    for f in path.rglob("*"):
        if f.is_file():
            st = f.stat()
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_size
    return total


# ---------------------------------------------------------------- one export

class Sampler(threading.Thread):
    """VmRSS of the child (and its GPU memory through NVML, when present) every ``period`` s."""

    def __init__(self, pid: int, progress: dict, period: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.progress, self.period = pid, progress, period
        self.curve: list = []
        self.stop = threading.Event()
        self.nvml_peak = None
        self._nvml = _nvml_handle()

    def run(self) -> None:
        t0 = time.perf_counter()
        while not self.stop.is_set():
            rss = _vm(self.pid, "VmRSS")
            if rss is not None:
                self.curve.append([round(time.perf_counter() - t0, 2), round(rss / 2**20, 1), self.progress.get("layers", 0)])
            if self._nvml is not None:
                used = _nvml_used(self._nvml, self.pid)
                if used is not None:
                    self.nvml_peak = max(self.nvml_peak or 0, used)
            self.stop.wait(self.period)


def _vm(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _nvml_handle():
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:  # noqa: BLE001 - NVML is optional
        return None


def _nvml_used(handle, pid: int) -> int | None:
    try:
        import pynvml

        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if p.pid == pid and p.usedGpuMemory:
                return int(p.usedGpuMemory)
    except Exception:  # noqa: BLE001
        return None
    return None


def parse_line(line: str, progress: dict, layer_seconds: list) -> None:
    """Progress lines: ``quantizing (R): 3/8 layer 3/8: ... (12.3 s)`` -> per-layer seconds."""
    if line.startswith("quantizing (") and line.rstrip().endswith(" s)"):
        try:
            done = int(line.split(": ", 1)[1].split("/", 1)[0])
            t = float(line.rsplit("(", 1)[1].split()[0])
        except (IndexError, ValueError):
            return
        prev = progress.get("t", 0.0)
        layer_seconds.append(round(t - prev, 3))
        progress["t"], progress["layers"] = t, done


def tensors_digest(folder: Path) -> str:
    """One SHA-256 over every tensor (name, dtype, shape, bytes) of the safetensors files under ``folder``:
    two exports wrote the same integers exactly when their digests match."""
    import hashlib

    from safetensors import safe_open

    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for name in sorted(sf.keys()):
                t = sf.get_tensor(name).contiguous()
                h.update(f"{f.relative_to(folder)}:{name}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.view(-1).view(torch_uint8()).numpy().tobytes())
    return h.hexdigest()


def torch_uint8():
    import torch

    return torch.uint8


def modelopt_tp(job: Job, tp: int) -> int:
    """The tensor parallelism ModelOpt can export ``job`` at: its INT4 AWQ export refuses a rank slice that is
    not a multiple of the 128-column block (7B's MLP, 11008 columns, splits 2 ways, not 8); sq-deploy pads instead."""
    if job.recipe != "modelopt-int4-awq":
        return tp
    from sqdeploy.testing.random_checkpoint import SHAPES

    dims = (SHAPES[job.shape]["hidden_size"], SHAPES[job.shape]["intermediate_size"])
    return max(t for t in range(1, tp + 1) if tp % t == 0 and all(d % (t * 128) == 0 for d in dims))


def run_export(job: Job, model: Path, calib: str, args, out_root: Path, timeout: float) -> Result:
    res = Result(job=asdict(job) | {"name": job.name})
    out = out_root / job.name
    phases_json = out_root / f"{job.name}.phases.json"
    log_path = Path(args.out) / "bench-export-gpu.log"  # one log for all exports: few files to carry back
    if job.role == "modelopt":  # ModelOpt's quantize + TensorRT-LLM export, same model and calibration set
        tp = modelopt_tp(job, args.tp)
        res.job["tp"] = tp
        if tp != args.tp:
            res.note = f"exported at tp {tp}: ModelOpt's INT4 export needs every rank's slice a multiple of 128"
        spec = {"tool": "modelopt", "model": str(model), "recipe": job.recipe, "threads": os.cpu_count() or 1,
                "calib": {"source": calib, "samples": args.calib_samples or 128, "seq_len": args.calib_seq_len or 512},
                "device": args.device, "tp": tp, "out": str(out)}
        cmd = [sys.executable, "-u", str(ROOT / "tools" / "bench_export.py"), "--job", json.dumps(spec)]
    else:
        cmd = [sys.executable, "-u", "-m", "sqdeploy.cli.export", str(model), "--recipe", job.recipe, "--target", job.target,
               "--device", args.device, "--calib", calib, "--out", str(out), "--force"]
        if job.target == "trtllm":
            cmd += ["--tp", str(args.tp)]
        if args.calib_samples:
            cmd += ["--calib-samples", str(args.calib_samples)]
        if args.calib_seq_len:
            cmd += ["--calib-seq-len", str(args.calib_seq_len)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SQDEPLOY_PHASES_JSON": str(phases_json),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep), **dict(job.env)}
    log(f"start {job.name} (timeout {timeout:.0f} s): {' '.join(cmd[3:])}")
    t0 = time.perf_counter()
    progress: dict = {}
    logf = log_path.open("a")
    logf.write(f"\n===== {job.name}: {' '.join(cmd)}\n")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, bufsize=1)
    sampler = Sampler(proc.pid, progress)
    sampler.start()
    tail: list[str] = []

    def reader():
        for line in proc.stdout:
            logf.write(line)
            parse_line(line, progress, res.layer_seconds)
            tail.append(line.rstrip())
            del tail[:-40]
            print(f"  | {line.rstrip()}", flush=True)

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    status, usage, timed_out, term_at = None, None, False, None
    while status is None:
        pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            status, usage = st, ru
            break
        now = time.perf_counter() - t0
        if not timed_out and now > timeout:
            timed_out, term_at = True, now
            log(f"{job.name}: timeout after {now:.0f} s, stopping it")
            proc.send_signal(signal.SIGTERM)
        elif timed_out and now > term_at + KILL_GRACE_S:
            proc.kill()
            term_at = float("inf")
        time.sleep(0.1)
    proc.returncode = os.waitstatus_to_exitcode(status)
    res.wall_s = round(time.perf_counter() - t0, 2)
    sampler.stop.set()
    sampler.join(2)
    th.join(5)
    logf.close()
    res.returncode = proc.returncode
    res.user_s, res.sys_s = round(usage.ru_utime, 2), round(usage.ru_stime, 2)
    res.minor_faults, res.major_faults = usage.ru_minflt, usage.ru_majflt
    res.ru_maxrss_mib = round(usage.ru_maxrss / 1024, 1)
    sampled = max((c[1] for c in sampler.curve), default=None)
    res.peak_rss_mib = sampled
    res.rss_curve = _thin(sampler.curve, 400)
    res.nvml_peak_mib = None if sampler.nvml_peak is None else round(sampler.nvml_peak / 2**20, 1)
    res.tail = tail[-12:]
    try:
        rec = json.loads(phases_json.read_text())
        res.phases = rec.get("phases", {})
        if rec.get("peak_rss_bytes"):
            res.peak_rss_mib = round(rec["peak_rss_bytes"] / 2**20, 1)
        for key, name in (("cuda_max_memory_allocated", "gpu_max_allocated_mib"), ("cuda_max_memory_reserved", "gpu_max_reserved_mib")):
            if rec.get(key) is not None:
                setattr(res, name, round(rec[key] / 2**20, 1))
        res.phases["(unattributed: interpreter start, imports)"] = round(res.wall_s - sum(res.phases.values()), 3)
    except (OSError, ValueError):
        pass
    if out.exists():
        res.output_mib = round(_du(out) / 2**20, 1)
        if proc.returncode == 0 and job.target == "trtllm" and job.role != "modelopt":
            res.tensors_sha256 = tensors_digest(out)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    res.status = "timeout" if timed_out else ("ok" if proc.returncode == 0 else "error")
    if res.status == "error":
        res.note = next((t for t in reversed(tail) if t.startswith(("error", "Error", "sq-export")) or "Error" in t), tail[-1] if tail else "")
    elif res.status == "timeout":
        res.note = f"stopped after {timeout:.0f} s at layer {progress.get('layers', 0)}/{job.layers}"
    log(f"end {job.name}: {res.status}, {res.wall_s} s, peak RSS {res.peak_rss_mib} MiB, GPU {res.gpu_max_allocated_mib} MiB")
    return res


def _thin(curve: list, n: int) -> list:
    if len(curve) <= n:
        return curve
    step = len(curve) / n
    return [curve[int(i * step)] for i in range(n)] + [curve[-1]]


# ---------------------------------------------------------------- plan and constants

def plan(args) -> list[Job]:
    """Exports in priority order: what the budget cuts off comes last."""
    shapes = [s for s in args.shapes.split(",") if s]
    recipes = [r for r in args.recipes.split(",") if r]
    first, L = shapes[0], args.layers
    jobs = [Job(first, L, r, "trtllm", "recipes") for r in recipes]
    if args.eager_gptq and args.device.startswith("cuda"):  # GPTQ's column loop launched eagerly: speed and integers
        jobs.insert(1, Job(first, L, recipes[0], "trtllm", "eager-gptq", env=(("SQDEPLOY_GPTQ_GRAPHS", "0"),)))
    if args.depth_layers and args.depth_layers != L:
        jobs.append(Job(first, args.depth_layers, recipes[0], "trtllm", "depth"))
    jobs += [Job(s, L, recipes[0], "trtllm", s) for s in shapes[1:]]
    if args.onnx:
        jobs.append(Job(first, L, args.onnx_recipe, "onnx", "onnx"))
    if args.full:
        from sqdeploy.testing.random_checkpoint import SHAPES

        jobs.append(Job(first, SHAPES[first]["num_hidden_layers"], recipes[0], "trtllm", "full", estimate_gate=True))
    for s in shapes[1:]:
        jobs += [Job(s, L, r, "trtllm", s) for r in recipes[1:]]
    if args.modelopt:  # after the first shape's recipes, at the same depth: the ratios the goals name
        at = len(recipes) + sum(j.role == "eager-gptq" for j in jobs)
        jobs[at:at] = [Job(first, L, r, "trtllm", "modelopt") for r in MODELOPT] + [Job(first, L, RTN_SQ, "trtllm", "recipes")]
    return jobs


def per_layer_fit(results: list[Result], shape: str, recipe: str, target: str = "trtllm") -> dict | None:
    """Fixed and per-layer wall seconds and peak RSS from two depths of the same export."""
    ok = sorted((r for r in results if _measured(r) and r.job["shape"] == shape and r.job["recipe"] == recipe
                 and r.job["target"] == target), key=lambda r: r.job["layers"])
    if len(ok) < 2 or ok[0].job["layers"] == ok[-1].job["layers"]:
        return None
    a, b = ok[0], ok[-1]
    dl = b.job["layers"] - a.job["layers"]
    out = {"from_layers": [a.job["layers"], b.job["layers"]]}
    for key in ("wall_s", "peak_rss_mib", "gpu_max_allocated_mib", "user_s", "sys_s", "minor_faults"):
        va, vb = getattr(a, key), getattr(b, key)
        if va is None or vb is None:
            continue
        slope = (vb - va) / dl
        out[key] = {"per_layer": round(slope, 3), "fixed": round(va - slope * a.job["layers"], 3)}
    return out


def borrowed_fit(results: list[Result], shape: str, recipe: str) -> dict | None:
    """One depth of ``recipe``: its per-layer part with the fixed part of another recipe measured at two
    depths on the same shape (start, tokenization and embedding do not depend on the recipe)."""
    own = [r for r in results if _measured(r) and r.job["shape"] == shape and r.job["recipe"] == recipe
           and r.job["target"] == "trtllm"]
    if not own:
        return None
    for other in dict.fromkeys(r.job["recipe"] for r in results):
        fit = per_layer_fit(results, shape, other)
        if fit and other != recipe:
            r, out = own[0], {"from_layers": [own[0].job["layers"]], "fixed_from": other}
            for key, val in fit.items():
                if not isinstance(val, dict) or getattr(r, key, None) is None:
                    continue
                if key in ("peak_rss_mib", "gpu_max_allocated_mib"):  # memory: the other recipe's growth per layer
                    out[key] = {"per_layer": val["per_layer"], "fixed": round(getattr(r, key) - val["per_layer"] * r.job["layers"], 3)}
                else:  # time, CPU, faults: the other recipe's fixed part
                    out[key] = {"per_layer": round((getattr(r, key) - val["fixed"]) / r.job["layers"], 3), "fixed": val["fixed"]}
            return out
    return None


def _measured(r: Result) -> bool:
    """A finished export of the default code path (the eager-GPTQ comparison run stays out of the fits)."""
    return r.status == "ok" and r.job.get("role") not in ("eager-gptq", "modelopt")


def estimate_seconds(results: list[Result], job: Job) -> float | None:
    fit = per_layer_fit(results, job.shape, job.recipe, job.target)
    if fit and "wall_s" in fit:
        w = fit["wall_s"]
        return w["fixed"] + w["per_layer"] * job.layers
    same = [r for r in results if _measured(r) and r.job["shape"] == job.shape and r.job["recipe"] == job.recipe
            and r.job["target"] == job.target]
    if same:  # no fixed part known: scale the whole time by depth (an upper bound)
        r = same[0]
        return r.wall_s * job.layers / r.job["layers"]
    return None


def layer_params(hf: dict) -> int:
    from sqdeploy.testing.random_checkpoint import layer_shapes

    n = 0
    for shape in layer_shapes(hf).values():
        k = 1
        for d in shape:
            k *= d
        n += k
    return n


def extrapolate_70b(results: list[Result], recipe: str) -> dict | None:
    """70B (80 layers, hidden 8192, GQA 8) from the measured per-layer constants.

    Time per layer scales with the layer's parameters (GEMMs over a fixed calibration set,
    GPTQ over every weight, bytes written); host RSS is the fixed part plus the measured
    per-layer growth times 80 plus one layer's share (scaled by parameters); GPU memory is
    fitted as a + b * layer parameters over the measured shapes (one layer in float32 plus
    activations that grow with the hidden size), or scaled by parameters from one shape.
    """
    from sqdeploy.testing.random_checkpoint import SHAPES

    fit, shape = None, None
    for shape in ("7b", "13b", "small"):
        fit = per_layer_fit(results, shape, recipe) or borrowed_fit(results, shape, recipe)
        if fit:
            break
    if not fit or "wall_s" not in fit:
        return None
    p_src, p70 = layer_params(SHAPES[shape]), layer_params(SHAPES["70b"])
    ratio = p70 / p_src
    wall = fit["wall_s"]["fixed"] + fit["wall_s"]["per_layer"] * ratio * 80
    out = {"from": f"{shape} at {fit['from_layers']} layers" + (f", fixed part of {fit['fixed_from']}" if "fixed_from" in fit else ""),
           "layer_param_ratio": round(ratio, 2),
           "wall_s": round(wall, 1), "per_layer_s": round(fit["wall_s"]["per_layer"] * ratio, 2)}
    if "peak_rss_mib" in fit:
        rss = fit["peak_rss_mib"]
        out["rss_per_layer_growth_mib"] = rss["per_layer"]
        layer_mib = layer_params(SHAPES[shape]) * 4 / 2**20  # one layer in float32
        out["peak_rss_mib"] = round(rss["fixed"] + layer_mib * (ratio - 1) + rss["per_layer"] * ratio * 80, 0)
    gpu = [(layer_params(SHAPES[r.job["shape"]]), r.gpu_max_allocated_mib) for r in results
           if _measured(r) and r.job["recipe"] == recipe and r.job["target"] == "trtllm" and r.gpu_max_allocated_mib]
    pts = sorted(set(gpu))
    if len({p for p, _ in pts}) >= 2:
        (p1, g1), (p2, g2) = pts[0], pts[-1]
        b = (g2 - g1) / (p2 - p1)
        out["gpu_mib"] = round(g1 + b * (p70 - p1), 0)
        out["gpu_fit"] = "linear in layer parameters over the measured shapes"
    elif pts:
        out["gpu_mib"] = round(pts[-1][1] * p70 / pts[-1][0], 0)
        out["gpu_fit"] = "scaled by layer parameters from one shape"
    return out


# ---------------------------------------------------------------- report

def summary_rows(results: list[Result]) -> list[list]:
    rows = []
    for r in results:
        j = r.job
        top = sorted(r.phases.items(), key=lambda kv: -kv[1])[:3]
        per_layer = f"{sum(r.layer_seconds) / len(r.layer_seconds):.1f}" if r.layer_seconds else ""
        rows.append([j["name"], j["role"], r.status, r.wall_s, per_layer, r.user_s, r.sys_s,
                     None if r.minor_faults is None else f"{r.minor_faults / 1e6:.2f}", r.peak_rss_mib,
                     r.gpu_max_allocated_mib, r.output_mib,
                     "; ".join(f"{k} {v:.1f}" for k, v in top) + (f" — {r.note}" if r.note else "")])
    return [["" if v is None else v for v in row] for row in rows]


HEAD = ["export", "role", "status", "wall s", "s/layer (quantize)", "user s", "sys s", "minor faults M",
        "peak RSS MiB", "GPU max alloc MiB", "output MiB", "largest phases (s) / note"]


def graph_vs_eager(res: list[Result]) -> list[str]:
    """GPTQ's column loop replayed from CUDA graphs against launched eagerly: the same export twice."""
    out = []
    for e in (r for r in res if r.job.get("role") == "eager-gptq" and r.status == "ok"):
        g = next((r for r in res if r.job["name"] == e.job["name"].removesuffix("-eager-gptq") and r.status == "ok"), None)
        if g is None:
            continue
        same = None if not (g.tensors_sha256 and e.tensors_sha256) else g.tensors_sha256 == e.tensors_sha256
        out += [f"GPTQ's column loop, `{g.job['name']}`: CUDA graphs {g.phases.get('GPTQ', float('nan')):.1f} s "
                f"(wall {g.wall_s} s) against eager launches {e.phases.get('GPTQ', float('nan')):.1f} s (wall {e.wall_s} s); "
                f"written tensors identical: {'yes' if same else 'no' if same is False else 'not compared'}.", ""]
    return out


def vs_modelopt(res: list[Result]) -> list[str]:
    """sq-deploy's exports against ModelOpt's on the same model, calibration set and tensor parallelism."""
    from sqdeploy.core.report import markdown_table

    ok = {(r.job["shape"], r.job["layers"], r.job["recipe"]): r for r in res
          if r.status == "ok" and r.job.get("role") != "eager-gptq"}  # the recipe as shipped, not its eager twin
    rows = []
    for ours, theirs, goal in VS_MODELOPT:
        for (shape, layers, recipe), o in ok.items():
            m = ok.get((shape, layers, theirs))
            if recipe != ours or m is None:
                continue
            ratio = o.wall_s / m.wall_s
            rows.append([f"{shape}, {layers} layers", f"`{ours}`", o.wall_s, f"{theirs} (tp {m.job.get('tp')})", m.wall_s, f"{ratio:.2f}x",
                         "" if goal is None else f"<= {goal}x: {'met' if ratio <= goal else 'missed'}",
                         o.gpu_max_allocated_mib, m.gpu_max_allocated_mib, o.peak_rss_mib, m.peak_rss_mib])
    if not rows:
        return []
    return ["## Against NVIDIA ModelOpt (same checkpoint, calibration set and tensor parallelism; wall seconds of each"
            " process, imports included)", "",
            markdown_table(["model", "sq-deploy", "s", "ModelOpt", "s", "ratio", "goal", "GPU MiB (ours)",
                            "GPU MiB (ModelOpt)", "RSS MiB (ours)", "RSS MiB (ModelOpt)"], rows), ""]


def markdown(report: dict) -> str:
    from sqdeploy.core.report import markdown_table

    res = [Result(**r) for r in report["results"]]
    lines = [f"# Export at 7B/13B scale on {report['env'].get('gpu') or report['env']['device']}", "",
             f"Command: `{report['command']}`", f"Commit: {report['env'].get('commit')}; date: {report['env']['date']}; "
             f"torch {report['env']['torch']}; {report['env']['cpus']} CPUs", "",
             markdown_table(HEAD, summary_rows(res)), ""]
    lines += graph_vs_eager(res)
    lines += vs_modelopt(res)
    lines += ["## Seconds per phase", ""]
    names = []
    for r in res:
        names += [k for k in r.phases if k not in names]
    if names:
        rows = [[k] + [r.phases.get(k, "") for r in res if r.phases] for k in names]
        lines += [markdown_table(["phase"] + [r.job["name"] for r in res if r.phases], rows), ""]
    lines += ["## Per-layer constants and 70B extrapolation", "",
              "Fits over two depths of one export (`fixed` + `per_layer` x layers). Host RSS between two small depths "
              "also holds the quantized model's output shard filling up (256 MiB, then written), so its per-layer "
              "growth there overstates the growth over 80 layers; the full-depth run, when it ran, is the second depth.", ""]
    for recipe, fit in report["fits"].items():
        lines.append(f"* `{recipe}`: {json.dumps(fit)}")
    for recipe, ex in report["extrapolation_70b"].items():
        lines.append(f"* 70B `{recipe}` (80 layers): {json.dumps(ex)}")
    lines += ["", "Checkpoints (seconds to draw and write): " + json.dumps(report["checkpoints"]), ""]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG"
    res = [Result(**r) for r in report["results"] if r["wall_s"] is not None]
    if not res:
        return "no export ran: no PNG"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 6))
    names = []
    for r in res:
        names += [k for k in r.phases if k not in names]
    bottom = [0.0] * len(res)
    cmap = plt.get_cmap("tab20")
    for i, k in enumerate(names):
        vals = [max(r.phases.get(k, 0.0), 0.0) for r in res]
        ax1.bar(range(len(res)), vals, bottom=bottom, label=k, color=cmap(i % 20))
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, r in enumerate(res):
        if not r.phases:
            ax1.bar(i, r.wall_s, color="lightgrey")
        ax1.text(i, (r.wall_s or 0) * 1.01, r.status if r.status != "ok" else "", ha="center", fontsize=7)
    ax1.set_xticks(range(len(res)), [r.job["name"] for r in res], rotation=60, ha="right", fontsize=7)
    ax1.set_ylabel("seconds")
    ax1.set_title("wall time by phase")
    ax1.legend(fontsize=6)
    for r in res:
        if r.rss_curve:
            ax2.plot([c[0] for c in r.rss_curve], [c[1] / 1024 for c in r.rss_curve], label=r.job["name"], lw=1)
    ax2.set_xlabel("seconds since start of the export")
    ax2.set_ylabel("host RSS GiB")
    ax2.set_title("host RSS of each export")
    ax2.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


# ---------------------------------------------------------------- main

def environment(args) -> dict:
    from sqdeploy.core.report import source_revision

    import torch

    env = {"device": args.device, "torch": torch.__version__, "cpus": os.cpu_count(), "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "host_mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    env["commit"] = source_revision(ROOT)
    return env


def missing_packages() -> list[str]:
    """Modules the export needs that do not import here (a package's own missing dependency included)."""
    import importlib

    missing = []
    for m in NEEDED + ("compressed_tensors.quantization",):
        try:
            importlib.import_module(m)
        except ImportError as exc:
            name = getattr(exc, "name", None) or m
            if name not in missing:
                missing.append(name)
    return missing


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the JSON, Markdown, PNG and logs")
    ap.add_argument("--shapes", default="7b,13b", help="comma-separated: 7b, 13b, 70b, small (the first gets every recipe)")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the reduced-depth models (default 2)")
    ap.add_argument("--depth-layers", type=int, default=4, help="a second depth for the first recipe (default 4; 0: none)")
    ap.add_argument("--full", action=argparse.BooleanOptionalAction, default=True,
                    help="the full-depth export of the first shape with the first recipe, when the budget allows")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True, help="also --target onnx (7B)")
    ap.add_argument("--onnx-recipe", default="w8a8-sq")
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--eager-gptq", action=argparse.BooleanOptionalAction, default=True,
                    help="also the first export with GPTQ's column loop launched eagerly (SQDEPLOY_GPTQ_GRAPHS=0), "
                         "to compare its time and its integers with the CUDA-graph loop")
    ap.add_argument("--modelopt", action="store_true",
                    help="also NVIDIA ModelOpt's INT8 SmoothQuant and INT4 AWQ (quantize + TensorRT-LLM export at --tp) on the"
                    " first shape at --layers, same calibration set (needs nvidia-modelopt)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--calib", default=None, help="calibration file (default: random-word prompts made here)")
    ap.add_argument("--calib-samples", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--calib-seq-len", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--budget", type=float, default=430.0, help="seconds after which no export starts (default 430)")
    ap.add_argument("--export-timeout", type=float, default=120.0,
                    help="seconds one export may take (default 120; the full-depth one gets what is left)")
    ap.add_argument("--work", default=None, help="folder for the checkpoints and exports (default: a temporary folder on "
                    "the local disk with the most free space; not tmpfs)")
    ap.add_argument("--keep", action="store_true", help="keep the exports and checkpoints")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    missing = missing_packages()
    if missing:
        print(f"error: missing Python packages {missing}; install them (or carry their wheels) first", file=sys.stderr)
        return 2
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is visible; use --device cpu", file=sys.stderr)
        return 2
    from sqdeploy.core.report import markdown_table
    from sqdeploy.testing.random_checkpoint import SHAPES, random_prompts

    for s in args.shapes.split(","):
        if s not in SHAPES:
            print(f"error: unknown shape {s}; choose from {sorted(SHAPES)}", file=sys.stderr)
            return 2
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-export-gpu-", dir=_local_tmp()))
    work.mkdir(parents=True, exist_ok=True)
    env = environment(args)
    log(f"environment: {env}; work folder {work} ({shutil.disk_usage(work).free / 2**30:.0f} GiB free)")
    report = {"command": " ".join([Path(sys.argv[0]).name if argv is None else "bench_export_gpu.py", *(sys.argv[1:] if argv is None else argv)]),
              "env": env, "args": vars(args), "results": [], "fits": {}, "extrapolation_70b": {}, "checkpoints": {}}
    models = Models(work, "cuda" if args.device.startswith("cuda") else "cpu")
    calib = args.calib
    results: list[Result] = []
    try:
        for job in plan(args):
            left = args.budget - (time.perf_counter() - T0)
            if left < MIN_START_S:
                results.append(Result(job=asdict(job) | {"name": job.name}, note=f"budget used ({left:.0f} s left)"))
                log(f"skip {job.name}: budget used")
                continue
            if job.estimate_gate:
                est = estimate_seconds(results, job)
                est = None if est is None else est + models.seconds_to_make(job.shape, job.layers)
                if est is None or est > left:
                    why = "no shallower run to estimate from" if est is None else f"estimated {est:.0f} s > {left:.0f} s left"
                    results.append(Result(job=asdict(job) | {"name": job.name}, note=why))
                    log(f"skip {job.name}: {why}")
                    continue
            try:
                model = models.get(job.shape, job.layers)
                if calib is None:
                    calib = str(random_prompts(work / "calib.jsonl", SHAPES[job.shape]["vocab_size"]))
                left = args.budget - (time.perf_counter() - T0)
                cap = left if job.role == "full" else min(left, args.export_timeout)
                res = run_export(job, model, calib, args, work, max(cap, MIN_START_S))
                res.checkpoint_mib = round(_du(model) / 2**20, 1)
            except Exception as exc:  # noqa: BLE001 - one failed export must not end the benchmark
                res = Result(job=asdict(job) | {"name": job.name}, status="error", note=f"{type(exc).__name__}: {exc}")
                log(f"{job.name}: {res.note}")
            results.append(res)
            _write(report, results, models, out)  # a partial report survives a kill
    finally:
        _write(report, results, models, out)
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown_table(HEAD, summary_rows(results)))
    for recipe, ex in report["extrapolation_70b"].items():
        print(f"70B {recipe}: {ex}")
    log(f"done; report in {out}")
    return 0


def _local_tmp() -> str | None:
    """The writable folder on a disk (not tmpfs, which is memory) with the most free space."""
    tmpfs = set()
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and parts[2] in ("tmpfs", "ramfs"):
                tmpfs.add(parts[1])
    except OSError:
        pass

    def mount_of(path: str) -> str:
        p = os.path.realpath(path)
        while not os.path.ismount(p):
            p = os.path.dirname(p)
        return p

    best, free = None, -1
    for d in ("/tmp", "/var/tmp", str(ROOT.parent)):
        if not (os.path.isdir(d) and os.access(d, os.W_OK)) or mount_of(d) in tmpfs:
            continue
        f = shutil.disk_usage(d).free
        if f > free:
            best, free = d, f
    return best


def _write(report: dict, results: list[Result], models: Models, out: Path) -> None:
    report["results"] = [asdict(r) for r in results]
    recipes = {r.job["recipe"] for r in results}
    report["fits"] = {f"{s}/{rec}": fit for rec in recipes for s in ("7b", "13b", "small")
                      if (fit := per_layer_fit(results, s, rec))}
    report["extrapolation_70b"] = {rec: ex for rec in recipes if (ex := extrapolate_70b(results, rec))}
    report["checkpoints"] = dict(models.seconds)
    report["bench_wall_s"] = round(time.perf_counter() - T0, 1)
    report["bench_children_rusage"] = {k: getattr(resource.getrusage(resource.RUSAGE_CHILDREN), k)
                                       for k in ("ru_utime", "ru_stime", "ru_minflt", "ru_maxrss")}
    (out / "bench-export-gpu.json").write_text(json.dumps(report, indent=1) + "\n")
    note = plot(report, out / "bench-export-gpu.png")
    md = markdown(report) + (f"\n{note}\n" if note else "")
    (out / "bench-export-gpu.md").write_text(md)


if __name__ == "__main__":
    sys.exit(main())
