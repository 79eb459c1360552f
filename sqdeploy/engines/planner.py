"""GPU memory planner: does a deployment fit, and how much KV cache is left?

Per GPU (tensor-parallel rank), the plan counts:

* **weights, exactly**, in the engine's layout (TensorRT-LLM's sharding rules): the
  fused qkv and the MLP's column-parallel linears split their outputs, ``dense`` and
  ``proj`` split their inputs; K/V heads are replicated when there are fewer than
  ``tp``; integer weights take ``bits/8`` bytes, plus every scale, zero point,
  per-channel smoothing vector and static scale of the format; biases, norms, the
  (vocab-parallel) embedding, OPT's position table and the lm_head (padded to a
  multiple of ``tp`` rows) stay in the model dtype.
* **KV cache per token**: ``2 * layers * ceil(kv_heads / tp) * head_dim`` elements of
  the KV dtype (1 byte for an INT8 cache).
* **activations, an estimate**: the largest set of live tensors inside one decoder
  layer for each of ``max_num_tokens`` packed tokens (layers reuse the buffers), plus
  fp32 logits of the last token of ``max_batch_size`` sequences.

What is left after a fixed reserve (CUDA context, cuBLAS and NCCL workspaces) times
the KV-cache memory fraction (TensorRT-LLM's ``kv_cache_free_gpu_mem_fraction``,
0.9) becomes the paged KV cache. A deployment *fits* when that cache holds at least
one sequence of ``max_seq_len`` tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from math import ceil
from typing import Any

from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.families import ModelConfig
from sqdeploy.core.report import markdown_table
from sqdeploy.engines.gpus import GIB, GpuProfile
from sqdeploy.engines.model_shape import WeightFormat, dtype_bytes

TP_CANDIDATES = (1, 2, 4, 8, 16)


def gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


@dataclass(frozen=True)
class Deployment:
    tp: int = 1
    max_batch_size: int = 64
    max_seq_len: int | None = None  # None: min(4096, the model's max positions)
    max_num_tokens: int = 8192
    kv_cache_fraction: float = 0.9
    reserve_bytes: int = GIB
    parallel_embedding: bool = True

    def seq_len(self, shape: ModelConfig) -> int:
        return self.max_seq_len or min(4096, shape.max_positions)


@dataclass(frozen=True)
class MemoryPlan:
    model: str
    shape: ModelConfig
    fmt: WeightFormat
    gpu: GpuProfile
    deployment: Deployment
    weights: dict[str, int] = field(default_factory=dict)  # per GPU, by component
    activation_bytes_per_token: int = 0
    activation_bytes: int = 0
    kv_bytes_per_token: int = 0
    free_bytes: int = 0  # after reserve, weights and activations
    kv_cache_bytes: int = 0
    kv_tokens: int = 0
    seq_len: int = 0
    problems: tuple[str, ...] = ()  # tensor-parallel splits the engine cannot run

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def max_batch(self) -> int:
        """Sequences of ``seq_len`` tokens the KV cache holds at once."""
        return self.kv_tokens // self.seq_len if self.seq_len else 0

    @property
    def fits(self) -> bool:
        return not self.problems and self.max_batch >= 1

    def why_not(self) -> str:
        if self.problems:
            return "; ".join(self.problems)
        d = self.deployment
        need = self.weight_bytes + self.activation_bytes + d.reserve_bytes
        if self.free_bytes <= 0:
            return (f"weights {gib(self.weight_bytes)} + activations {gib(self.activation_bytes)} + reserve "
                    f"{gib(d.reserve_bytes)} = {gib(need)} per GPU > {gib(self.gpu.memory_bytes)} ({self.gpu.name})")
        return (f"the KV cache left ({gib(self.kv_cache_bytes)}, {self.kv_tokens} tokens) cannot hold one sequence "
                f"of {self.seq_len} tokens ({gib(self.seq_len * self.kv_bytes_per_token)})")

    def require_fit(self, what: str = "this deployment") -> None:
        if self.fits:
            return
        hint = "use more GPUs (--tp), a lower-bit recipe, a shorter --max-seq-len or a larger --gpu"
        better = min_gpus(self.shape, self.fmt, self.gpu, self.deployment)
        if better is not None and better.deployment.tp != self.deployment.tp:
            hint = f"tp {better.deployment.tp} fits ({better.max_batch} sequences of {better.seq_len} tokens); pass --tp {better.deployment.tp}"
        raise SqDeployError(f"{what} does not fit {self.deployment.tp} x {self.gpu.name}: {self.why_not()}; {hint}")

    def rows(self) -> list[list[Any]]:
        def g(n: int) -> float:
            return round(n / GIB, 3)

        rows = [[f"weights: {k}", g(v)] for k, v in self.weights.items() if v]
        rows += [
            ["weights per GPU (total)", g(self.weight_bytes)],
            [f"activations ({self.deployment.max_num_tokens} tokens, batch {self.deployment.max_batch_size})", g(self.activation_bytes)],
            ["reserve (CUDA context, workspaces)", g(self.deployment.reserve_bytes)],
            [f"KV cache ({self.deployment.kv_cache_fraction:.0%} of the rest)", g(max(self.kv_cache_bytes, 0))],
        ]
        return rows

    def summary(self) -> str:
        head = (f"{self.model}: {self.fmt.name}, tp {self.deployment.tp} x {self.gpu.name} "
                f"({self.gpu.memory_gib:.1f} GiB each)")
        table = markdown_table(["per GPU", "GiB"], self.rows())
        kv = (f"KV cache: {self.kv_bytes_per_token} bytes/token/GPU, {self.kv_tokens} tokens = "
              f"{self.max_batch} sequences of {self.seq_len} tokens")
        verdict = "fits" if self.fits else f"DOES NOT FIT: {self.why_not()}"
        return f"{head}\n{table}\n{kv}\n{verdict}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "format": self.fmt.name, "gpu": self.gpu.name, "gpu_memory_bytes": self.gpu.memory_bytes,
            "deployment": asdict(self.deployment), "weights_bytes": dict(self.weights), "weight_bytes": self.weight_bytes,
            "activation_bytes_per_token": self.activation_bytes_per_token, "activation_bytes": self.activation_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token, "kv_cache_bytes": self.kv_cache_bytes,
            "kv_tokens": self.kv_tokens, "seq_len": self.seq_len, "max_batch": self.max_batch,
            "fits": self.fits, "problems": list(self.problems),
        }


def _rank_linears(s: ModelConfig, tp: int) -> Iterator[tuple[str, int, int, bool, bool]]:
    """(module, out_features, in_features, row_parallel, has_bias) of one layer on one rank."""
    q = s.num_heads // tp * s.head_dim
    kv = ceil(s.num_kv_heads / tp) * s.head_dim
    i = s.intermediate_size // tp
    yield "qkv", q + 2 * kv, s.hidden_size, False, s.qkv_bias
    yield "dense", s.hidden_size, q, True, s.o_bias
    yield "fc", i, s.hidden_size, False, s.mlp_bias
    if s.gated_mlp:
        yield "gate", i, s.hidden_size, False, s.mlp_bias
    yield "proj", s.hidden_size, i, True, s.mlp_bias


def linear_bytes(fmt: WeightFormat, module: str, out: int, inp: int, row: bool) -> dict[str, int]:
    """Bytes of one quantized (or float) linear's weight, scales, zeros and vectors."""
    out_b = {"linear weights": out * inp * fmt.bits // 8}
    if not fmt.quantized:
        return out_b
    if fmt.granularity == "group":
        n_scales = out * (inp // fmt.group_size)
    elif fmt.granularity == "channel" or (fmt.qkv_per_channel and module == "qkv"):
        n_scales = out
    else:
        n_scales = 1
    out_b["scales"] = n_scales * fmt.scale_bytes + fmt.scalar_bytes_per_linear
    out_b["zero points"] = n_scales * fmt.zero_bytes
    out_b["smoothing vectors"] = inp * (fmt.input_vector_bytes + (fmt.row_input_vector_bytes if row else 0))
    return out_b


def weight_bytes(s: ModelConfig, fmt: WeightFormat, tp: int, parallel_embedding: bool = True) -> dict[str, int]:
    """Per-GPU weight bytes by component (see the module docstring for the rules)."""
    d = dtype_bytes(s)
    total = {"linear weights": 0, "scales": 0, "zero points": 0, "smoothing vectors": 0, "biases": 0}
    for module, out, inp, row, bias in _rank_linears(s, tp):
        for k, v in linear_bytes(fmt, module, out, inp, row).items():
            total[k] += v * s.num_layers
        total["biases"] += (out if bias else 0) * d * s.num_layers
    total["scales"] += fmt.scalar_bytes_per_layer * s.num_layers
    vocab_rows = ceil(s.vocab_size / tp)
    total["embeddings"] = (vocab_rows if parallel_embedding else s.vocab_size) * s.hidden_size * d
    if s.position == "learned":
        total["embeddings"] += (ceil(s.max_positions / tp) if parallel_embedding else s.max_positions) * s.hidden_size * d
    total["lm_head"] = vocab_rows * s.hidden_size * d
    total["norms"] = (2 * s.num_layers + 1) * s.hidden_size * (2 if s.norm_has_bias else 1) * d
    return total


def kv_bytes_per_token(s: ModelConfig, fmt: WeightFormat, tp: int) -> int:
    return 2 * s.num_layers * ceil(s.num_kv_heads / tp) * s.head_dim * fmt.kv_cache_bits // 8


def activation_bytes_per_token(s: ModelConfig, fmt: WeightFormat, tp: int) -> int:
    """Largest live set inside one layer: residual + normed input + qkv + attention
    output, or residual + normed input + the MLP's intermediate outputs."""
    q = s.num_heads // tp * s.head_dim
    qkv = q + 2 * ceil(s.num_kv_heads / tp) * s.head_dim
    i = s.intermediate_size // tp
    attn = 2 * s.hidden_size + qkv + q
    mlp = 2 * s.hidden_size + (3 if s.gated_mlp else 2) * i
    int8_copy = max(s.hidden_size, i) if fmt.act_bits == 8 else 0
    return max(attn, mlp) * dtype_bytes(s) + int8_copy


def tp_problems(s: ModelConfig, fmt: WeightFormat, tp: int) -> list[str]:
    """Splits TensorRT-LLM cannot build (heads, KV heads, FFN, weight-only padding)."""
    out = []
    if s.num_heads % tp:
        out.append(f"{s.num_heads} attention heads are not divisible by tp {tp}")
    if (s.num_kv_heads >= tp and s.num_kv_heads % tp) or (s.num_kv_heads < tp and tp % s.num_kv_heads):
        out.append(f"{s.num_kv_heads} KV heads cannot be split or replicated over tp {tp}")
    if s.intermediate_size % tp:
        out.append(f"intermediate size {s.intermediate_size} is not divisible by tp {tp}")
    if fmt.quantized and fmt.act_bits == 16:
        pad = (max(64, fmt.group_size) if fmt.granularity == "group" else 64) * tp
        for module, out_l, in_l, row, _ in _rank_linears(s, 1):
            if out_l % pad or in_l % pad:
                out.append(f"{module} [{out_l}, {in_l}] is not a multiple of {pad} (TensorRT-LLM pads weight-only layers "
                           f"to {pad // tp} x tp and then rejects the checkpoint)")
                break
    return out


def plan_memory(s: ModelConfig, fmt: WeightFormat, gpu: GpuProfile, dep: Deployment, model: str = "model") -> MemoryPlan:
    tp = dep.tp
    weights = weight_bytes(s, fmt, tp, dep.parallel_embedding)
    act_tok = activation_bytes_per_token(s, fmt, tp)
    act = act_tok * dep.max_num_tokens + dep.max_batch_size * s.vocab_size * 4
    free = gpu.memory_bytes - dep.reserve_bytes - sum(weights.values()) - act
    kv_cache = int(free * dep.kv_cache_fraction) if free > 0 else 0
    kv_tok = kv_bytes_per_token(s, fmt, tp)
    return MemoryPlan(
        model=model, shape=s, fmt=fmt, gpu=gpu, deployment=dep, weights=weights,
        activation_bytes_per_token=act_tok, activation_bytes=act, kv_bytes_per_token=kv_tok,
        free_bytes=free, kv_cache_bytes=kv_cache, kv_tokens=kv_cache // kv_tok, seq_len=dep.seq_len(s),
        problems=tuple(tp_problems(s, fmt, tp)),
    )


def min_gpus(s: ModelConfig, fmt: WeightFormat, gpu: GpuProfile, dep: Deployment, model: str = "model") -> MemoryPlan | None:
    """The plan with the smallest tensor-parallel degree that fits, or None."""
    from dataclasses import replace

    for tp in TP_CANDIDATES:
        plan = plan_memory(s, fmt, gpu, replace(dep, tp=tp), model)
        if plan.fits:
            return plan
    return None
