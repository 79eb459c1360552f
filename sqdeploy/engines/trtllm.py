"""TensorRT-LLM engines from a TensorRT-LLM checkpoint: plan, exact ``trtllm-build`` command, run.

The checkpoint decides most flags: the tensor-parallel degree comes only from its
``mapping`` (``trtllm-build`` has no ``--tp``: ``--workers`` builds the ranks in
parallel), the plugin dtype from its ``dtype``, and its ``quantization`` decides
whether paged context FMHA may stay on (an INT8 KV cache forbids it). The quantized
GEMM plugins (weight-only, group-wise, SmoothQuant) are not command-line flags:
``trtllm-build`` turns them on from ``quant_algo``; the plan lists which.

The engine flow exists in TensorRT-LLM up to 1.2.x and was removed in 1.3, so the
build checks the installed version first (``pip install 'sq-deploy[trtllm]'`` pins
``tensorrt_llm<1.3``); for newer TensorRT-LLM, export ``--target trtllm-hf`` and serve
it with the PyTorch backend instead.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shlex
import shutil
import subprocess
from dataclasses import dataclass, replace
from math import ceil
from pathlib import Path
from typing import Any

from sqdeploy.core.errors import MissingDependencyError, SqDeployError
from sqdeploy.core.report import markdown_table
from sqdeploy.engines.gpus import GpuProfile, check_visible_gpus
from sqdeploy.engines.model_shape import WeightFormat, config_from_trtllm, read_config, trtllm_family
from sqdeploy.engines.planner import Deployment, MemoryPlan, plan_memory
from sqdeploy.formats.trtllm.config import GROUPWISE, SQ_PLUGIN, WEIGHT_ONLY

MIN_VERSION = (0, 12)
REMOVED_IN = (1, 3)
BUILD_RECORD = "sqdeploy-build.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")


@dataclass(frozen=True)
class TrtllmOptions:
    gpu: GpuProfile
    max_batch_size: int = 64
    max_input_len: int | None = None  # None: half of max_seq_len, at most 2048
    max_seq_len: int | None = None  # None: min(4096, max_position_embeddings)
    max_num_tokens: int = 8192
    kv_cache_fraction: float = 0.9
    workers: int | None = None  # None: one per rank
    tokenizer: Path | None = None  # copied next to the engines (default: the checkpoint's own files)


@dataclass(frozen=True)
class TrtllmPlan:
    ckpt: Path
    out: Path
    config: dict
    options: TrtllmOptions
    command: tuple[str, ...]
    reasons: tuple[tuple[str, str], ...]  # (flag, why)
    automatic: tuple[str, ...]  # plugins trtllm-build enables from the checkpoint
    memory: MemoryPlan
    tokenizer_files: tuple[Path, ...]

    @property
    def world_size(self) -> int:
        return int(self.config["mapping"]["world_size"])

    @property
    def quantization(self) -> dict:
        return self.config.get("quantization") or {}

    def command_for(self, output_dir: Path) -> list[str]:
        cmd = list(self.command)
        cmd[cmd.index("--output_dir") + 1] = str(output_dir)
        return cmd

    def summary(self) -> str:
        m = self.config["mapping"]
        q = self.quantization
        head = (f"TensorRT-LLM build plan: {self.config['architecture']} {self.config['dtype']}, "
                f"quant_algo {q.get('quant_algo')}, kv_cache_quant_algo {q.get('kv_cache_quant_algo')}, "
                f"tp {m.get('tp_size', 1)} x pp {m.get('pp_size', 1)}, target {self.options.gpu.name}")
        flags = markdown_table(["flag", "why"], [list(r) for r in self.reasons])
        auto = "\n".join(f"- {a}" for a in self.automatic)
        tok = ", ".join(p.name for p in self.tokenizer_files) or "none (pass --tokenizer DIR to copy one beside the engines)"
        return (f"{head}\n\n{shlex.join(self.command)}\n\n{flags}\n\nenabled by trtllm-build from the checkpoint:\n{auto}\n\n"
                f"tokenizer: {tok}\n\n{self.memory.summary()}")

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoint": str(self.ckpt), "output": str(self.out), "command": list(self.command),
                "reasons": dict(self.reasons), "automatic_plugins": list(self.automatic),
                "memory": self.memory.to_dict(), "gpu": self.options.gpu.name}


def validate_config(cfg: dict, where: Path) -> None:
    """The checks on config.json that need no tensors (the full check is sq-check trtllm)."""
    for key in ("architecture", "dtype", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if key not in cfg:
            raise SqDeployError(f"{where}: '{key}' is missing; this is not a TensorRT-LLM checkpoint config (re-export with sq-export --target trtllm)")
    trtllm_family(cfg)
    if cfg["dtype"] not in ("float16", "bfloat16", "float32"):
        raise SqDeployError(f"{where}: dtype {cfg['dtype']!r} must be float16, bfloat16 or float32")
    m = cfg.get("mapping") or {}
    tp, pp, cp = (int(m.get(k, 1)) for k in ("tp_size", "pp_size", "cp_size"))
    if int(m.get("world_size", 1)) != tp * pp * cp:
        raise SqDeployError(f"{where}: mapping.world_size {m.get('world_size')} != tp_size {tp} x pp_size {pp} x cp_size {cp}")
    WeightFormat.from_trtllm(cfg.get("quantization"), cfg["dtype"])  # raises on an unknown quant_algo


def read_checkpoint_config(ckpt: Path) -> dict:
    if not ckpt.is_dir():
        raise SqDeployError(f"checkpoint directory {ckpt} does not exist; pass the --out of 'sq-export --target trtllm'")
    cfg, path = read_config(ckpt)
    cfg.setdefault("mapping", {"world_size": 1, "tp_size": 1, "pp_size": 1})
    cfg["mapping"].setdefault("world_size", 1)
    validate_config(cfg, path)
    return cfg


def _automatic_plugins(algo: str | None, dtype: str, world_size: int) -> list[str]:
    out = []
    if algo in WEIGHT_ONLY:
        out.append(f"weight_only_quant_matmul_plugin = {dtype} ({algo}: INT{algo[1]} weight-only GEMM)")
    elif algo in GROUPWISE:
        out.append(f"weight_only_groupwise_quant_matmul_plugin = {dtype} ({algo}: group-wise INT4 GEMM; weights interleaved for the build GPU)")
    elif algo in SQ_PLUGIN:
        out.append(f"smooth_quant_gemm_plugin, rmsnorm/layernorm_quantization_plugin = {dtype}, quantize_per_token_plugin, "
                   f"quantize_tensor_plugin ({algo}: INT8 GEMMs with fused norm quantization)")
    elif algo == "W8A8_SQ_PER_CHANNEL":
        out.append("no plugin: TensorRT's native INT8 Q/DQ GEMMs (ModelOpt's SmoothQuant layout)")
    else:
        out.append(f"no quantization plugin ({algo or dtype})")
    if world_size > 1:
        out.append(f"nccl_plugin = {dtype} (all-reduce across the {world_size} ranks)")
    return out


def _sequence_limits(cfg: dict, o: TrtllmOptions) -> tuple[int, int]:
    max_pos = int(cfg.get("max_position_embeddings") or 4096)
    max_seq = o.max_seq_len or min(4096, max_pos)
    max_in = o.max_input_len or max(1, min(2048, max_seq // 2))
    if not (1 <= max_in <= max_seq):
        raise SqDeployError(f"--max-input-len {max_in} must be between 1 and --max-seq-len {max_seq}")
    if max_seq > max_pos:
        raise SqDeployError(f"--max-seq-len {max_seq} exceeds the model's {max_pos} positions; pass at most {max_pos}")
    if o.max_num_tokens < max_in:
        raise SqDeployError(f"--max-num-tokens {o.max_num_tokens} must be at least --max-input-len {max_in} (one whole prompt per step)")
    return max_in, max_seq


def plan_build(ckpt: str | Path, out: str | Path, options: TrtllmOptions) -> TrtllmPlan:
    """Everything decided before anything runs; raises on any problem, with the numbers."""
    ckpt, out = Path(ckpt), Path(out)
    cfg = read_checkpoint_config(ckpt)
    dtype, ws = cfg["dtype"], int(cfg["mapping"]["world_size"])
    tp, pp = int(cfg["mapping"].get("tp_size", 1)), int(cfg["mapping"].get("pp_size", 1))
    q = cfg.get("quantization") or {}
    algo, kv = q.get("quant_algo"), q.get("kv_cache_quant_algo")
    if (algo == "FP8" or kv == "FP8") and not options.gpu.fp8:
        raise SqDeployError(f"FP8 needs Ada or Hopper (sm89+); {options.gpu.name} is sm{options.gpu.sm}: re-export with INT8 or INT4, or pass --gpu h100-80g")
    max_in, max_seq = _sequence_limits(cfg, options)
    paged_ctx = "disable" if kv == "INT8" else "enable"
    workers = options.workers or ws
    cmd = ["trtllm-build", "--checkpoint_dir", str(ckpt), "--output_dir", str(out), "--workers", str(workers),
           "--gemm_plugin", dtype, "--gpt_attention_plugin", dtype, "--kv_cache_type", "paged",
           "--context_fmha", "enable", "--use_paged_context_fmha", paged_ctx, "--remove_input_padding", "enable",
           "--max_batch_size", str(options.max_batch_size), "--max_input_len", str(max_in),
           "--max_seq_len", str(max_seq), "--max_num_tokens", str(options.max_num_tokens), "--max_beam_width", "1"]
    reasons = (
        ("--workers", f"build the {ws} rank(s) (tp {tp} x pp {pp} from the checkpoint's mapping) in parallel, one GPU each"),
        ("--gemm_plugin", f"cuBLASLt in {dtype} for the GEMMs that stay in float (lm_head; all of them in a float model)"),
        ("--gpt_attention_plugin", "fused attention; needed for in-flight batching and the paged KV cache"),
        ("--kv_cache_type paged", "paged KV cache, what Triton's in-flight batching allocates from"),
        ("--context_fmha", "fused multi-head attention for the prompt (context) phase"),
        ("--use_paged_context_fmha", "disable: TensorRT-LLM refuses paged context FMHA with an INT8 KV cache (no chunked "
         "context or KV reuse then)" if kv == "INT8" else "enable: chunked context and KV-cache reuse"),
        ("--remove_input_padding", "pack the tokens of a batch without padding"),
        ("--max_batch_size", f"{options.max_batch_size} concurrent sequences"),
        ("--max_input_len / --max_seq_len", f"prompts up to {max_in} tokens, prompt + output up to {max_seq}"),
        ("--max_num_tokens", f"{options.max_num_tokens} packed tokens per iteration (sizes the activation buffers)"),
    )
    shape = config_from_trtllm(cfg)
    shape = replace(shape, num_layers=ceil(shape.num_layers / pp))
    dep = Deployment(tp=tp, max_batch_size=options.max_batch_size, max_seq_len=max_seq, max_num_tokens=options.max_num_tokens,
                     kv_cache_fraction=options.kv_cache_fraction, parallel_embedding=bool(cfg.get("use_parallel_embedding", False)))
    memory = plan_memory(shape, WeightFormat.from_trtllm(q, dtype), options.gpu, dep, model=ckpt.name)
    memory.require_fit(f"{ckpt} (engines for max_seq_len {max_seq}, max_batch_size {options.max_batch_size})")
    tok_dir = options.tokenizer or ckpt
    if options.tokenizer is not None and not options.tokenizer.is_dir():
        raise SqDeployError(f"--tokenizer {options.tokenizer} is not a directory; pass the HF model directory that holds tokenizer.json")
    tokenizer = tuple(tok_dir / f for f in TOKENIZER_FILES if (tok_dir / f).exists())
    if options.tokenizer is not None and not tokenizer:
        raise SqDeployError(f"--tokenizer {options.tokenizer} holds no tokenizer files (tokenizer.json, tokenizer.model, ...)")
    return TrtllmPlan(ckpt, out, cfg, options, tuple(cmd), reasons, tuple(_automatic_plugins(algo, dtype, ws)), memory, tokenizer)


def installed_version() -> str:
    """The installed TensorRT-LLM version, refused outside the engine flow's releases."""
    from packaging.version import Version

    if importlib.util.find_spec("tensorrt_llm") is None:
        raise MissingDependencyError("tensorrt_llm", "building TensorRT-LLM engines",
                                     "pip install 'sq-deploy[trtllm]' (TensorRT-LLM 0.12 to 1.2.x, Linux with an NVIDIA GPU)")
    try:
        text = importlib.metadata.version("tensorrt_llm")
    except importlib.metadata.PackageNotFoundError:
        text = importlib.metadata.version("tensorrt-llm")
    release = Version(text).release[:2]
    if release >= REMOVED_IN:
        raise SqDeployError(
            f"TensorRT-LLM {text} no longer has the TensorRT-engine flow (trtllm-build was removed in 1.3): install "
            "'tensorrt_llm<1.3' (pip install 'sq-deploy[trtllm]'), or export --target trtllm-hf and serve that checkpoint "
            "with TensorRT-LLM's PyTorch backend (sq-build --triton CKPT writes its Triton repository)"
        )
    if release < MIN_VERSION:
        raise SqDeployError(f"TensorRT-LLM {text} is older than 0.12, whose checkpoint format this build targets; pip install 'sq-deploy[trtllm]'")
    return text


def check_checkpoint(ckpt: Path, world_size: int) -> str:
    """Rank files, then ``sq-check trtllm`` (names, shapes, dtypes and values) before a long build."""
    from sqdeploy.formats.trtllm.check import check_dir

    missing = [f"rank{r}.safetensors" for r in range(world_size) if not (ckpt / f"rank{r}.safetensors").exists()]
    if missing:
        raise SqDeployError(f"{ckpt} lacks {', '.join(missing)} (mapping.world_size is {world_size}); re-export the checkpoint")
    result = check_dir(ckpt)
    print(result.table(), flush=True)
    if not result.ok:
        raise SqDeployError(f"{ckpt} fails sq-check trtllm (table above); re-export the checkpoint")
    return "sq-check trtllm passed"


def _adapt_to_cli(cmd: list[str], help_text: str) -> list[str]:
    """Releases before ``--kv_cache_type`` spell the paged cache ``--paged_kv_cache enable``."""
    if "--kv_cache_type" not in help_text and "--paged_kv_cache" in help_text:
        i = cmd.index("--kv_cache_type")
        cmd[i:i + 2] = ["--paged_kv_cache", "enable"]
    unknown = [c for c in cmd[1:] if c.startswith("--") and c not in help_text]
    if unknown:
        raise SqDeployError(f"this trtllm-build does not accept {', '.join(unknown)}; install a TensorRT-LLM release from 0.12 to 1.2.x")
    return cmd


def run_build(plan: TrtllmPlan, tmp: Path) -> dict[str, Any]:
    """Check the environment, then run trtllm-build into ``tmp`` and verify its output."""
    version = installed_version()
    exe = shutil.which("trtllm-build")
    if exe is None:
        raise SqDeployError("tensorrt_llm is installed but 'trtllm-build' is not on PATH; activate the environment that installed it")
    check_visible_gpus(plan.world_size, plan.options.gpu, f"building {plan.world_size} TensorRT-LLM engine rank(s)")
    checked = check_checkpoint(plan.ckpt, plan.world_size)
    help_text = subprocess.run([exe, "--help"], capture_output=True, text=True, check=False).stdout
    cmd = _adapt_to_cli(plan.command_for(tmp), help_text)
    proc = subprocess.run(cmd, check=False)
    if proc.returncode:
        raise SqDeployError(f"trtllm-build failed with exit code {proc.returncode} (log above); nothing was written")
    engines = [tmp / f"rank{r}.engine" for r in range(plan.world_size)]
    if not (tmp / "config.json").exists() or not all(e.exists() for e in engines):
        raise SqDeployError(f"trtllm-build finished but did not write config.json and {plan.world_size} rank*.engine files")
    for f in plan.tokenizer_files:
        shutil.copy(f, tmp / f.name)
    record = {"format": "sqdeploy.trtllm-engine", "tensorrt_llm": version, "checkpoint_check": checked,
              "command": cmd, **plan.to_dict()}
    (tmp / BUILD_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return {"engine": "trtllm", "tensorrt_llm": version, "engines": [e.name for e in engines],
            "bytes": sum(e.stat().st_size for e in engines)}
