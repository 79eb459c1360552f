"""The vocabulary every family module fills in.

A model family is described once, as data: where its tensors live in a Hugging Face
checkpoint, which op feeds which linears (the smoothing groups), and how its config
maps onto :class:`ModelConfig`. Everything downstream (the reference model,
calibration, smoothing, the ONNX and TensorRT-LLM writers) works on the *canonical*
names defined here and asks the family record for anything family-specific, so no
other module ever spells an HF layer name.

Canonical names
---------------
globals: ``embed``, ``pos_embed`` (learned positions), ``final_norm``, ``lm_head``
per layer ``i``: ``layers.{i}.attn_norm``, ``layers.{i}.mlp_norm`` and the linears
``q k v o`` (attention) and ``gate up down`` (MLP; a non-gated MLP has ``up`` and
``down`` only, e.g. OPT's fc1/fc2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

ATTN_LINEARS = ("q", "k", "v", "o")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture facts the reference model and every writer need.

    ``hf_config`` keeps the original config dict so that exports can copy fields
    verbatim (tokenizer ids, rope parameters) instead of re-deriving them.
    """

    family: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int
    norm: str  # "rms" | "layernorm"
    norm_eps: float
    act: str  # key of sqdeploy.model.layers.ACTIVATIONS
    gated_mlp: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    position: str = "rope"  # "rope" | "learned"
    pos_offset: int = 0  # OPT stores 2 unused rows before position 0
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None
    tie_embeddings: bool = False
    sliding_window: int | None = None
    dtype: str = "float16"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    hf_config: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def linears(self) -> tuple[str, ...]:
        mlp = ("gate", "up", "down") if self.gated_mlp else ("up", "down")
        return ATTN_LINEARS + mlp

    def linear_shape(self, name: str) -> tuple[int, int]:
        """(out_features, in_features) of a canonical linear."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q": (self.q_size, h),
            "k": (self.kv_size, h),
            "v": (self.kv_size, h),
            "o": (h, self.q_size),
            "gate": (i, h),
            "up": (i, h),
            "down": (h, i),
        }[name]

    def linear_has_bias(self, name: str) -> bool:
        if name in ("q", "k", "v"):
            return self.qkv_bias
        if name == "o":
            return self.o_bias
        return self.mlp_bias

    @property
    def norm_has_bias(self) -> bool:
        return self.norm == "layernorm"

    @property
    def global_names(self) -> list[str]:
        """Canonical names of the tensors outside the decoder layers (lm_head only when untied)."""
        names = ["embed.weight", "final_norm.weight"]
        if self.norm_has_bias:
            names.append("final_norm.bias")
        if self.position == "learned":
            names.append("pos_embed.weight")
        if not self.tie_embeddings:
            names.append("lm_head.weight")
        return names


@dataclass(frozen=True)
class SmoothGroup:
    """One smoothing site: ``producer`` feeds every linear in ``consumers``.

    SmoothQuant divides the activation by ``s`` and multiplies the consumers' weight
    columns by ``s``; the division is folded into the producer (a norm's weight and
    bias, or a linear's output rows), so inference pays nothing.

    ``kind`` says how the fold works:
      * ``norm``   - producer is a norm (RMSNorm/LayerNorm weight, and bias if any)
      * ``linear`` - producer is a linear whose output rows map 1:1 to consumer inputs
        (up->down through SiLU(gate)*up or ReLU, both of which commute with a positive
        per-channel scale of ``up``)
      * ``gqa``    - producer ``v`` feeds ``o`` through attention: each KV head is read by
        ``num_heads / num_kv_heads`` query heads, so one scale per KV channel is shared
        by the o_proj columns of the query heads of its group.
    """

    producer: str
    consumers: tuple[str, ...]
    kind: str  # "norm" | "linear" | "gqa"

    @property
    def name(self) -> str:
        return f"{self.producer}->{'/'.join(self.consumers)}"


@dataclass(frozen=True)
class TrtllmModule:
    """One TensorRT-LLM linear module of a decoder layer: the canonical linears whose rows it
    concatenates (in order) and its tensor-parallel kind ("column": output rows are split over
    the ranks, "row": input columns are split and the output is all-reduced)."""

    fuse: tuple[str, ...]
    tp: str


@dataclass(frozen=True)
class TrtllmLayout:
    """A family's TensorRT-LLM checkpoint layout (read by ``sqdeploy/formats/trtllm``).

    ``linears``: module name under ``transformer.layers.{i}.`` -> :class:`TrtllmModule`;
    ``norms``: TensorRT-LLM norm module -> canonical norm; ``globals``: global tensor ->
    (canonical tensor, split), where "vocab" splits rows over the ranks (zero-padded to a
    multiple of tp), "embedding" does the same when the config's use_parallel_embedding is
    set (else whole on every rank) and "replicated" is whole on every rank;
    ``config_fields``: config.json key -> (ModelConfig field it is written from, HF config key
    it reads back into); ``config``: keys written verbatim into config.json;
    ``hf_unified_pre_quant_scale``: in ModelOpt's unified HF checkpoint, the linears loaded
    unfused that carry their own pre_quant_scale (None: the family has no unified layout).
    """

    architecture: str
    decoder: str
    linears: Mapping[str, TrtllmModule]
    norms: Mapping[str, str]
    globals: Mapping[str, tuple[str, str]]
    config_fields: Mapping[str, tuple[str, str]]
    config: Mapping[str, Any]
    hf_unified_pre_quant_scale: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Family:
    """Everything sq-deploy knows about one model family."""

    name: str
    architectures: tuple[str, ...]
    config_from_hf: Callable[[Mapping[str, Any]], ModelConfig]
    # canonical tensor name -> HF tensor name; layer entries use "{i}"
    hf_names: Mapping[str, str]
    smoothing_groups: tuple[SmoothGroup, ...]
    # TensorRT-LLM checkpoint layout (None: the family has no TensorRT-LLM target)
    trtllm: TrtllmLayout | None = None

    def hf_name(self, canonical: str) -> str:
        """HF tensor name of a canonical tensor name such as ``layers.3.q.weight``."""
        if canonical.startswith("layers."):
            _, idx, rest = canonical.split(".", 2)
            return self.hf_names[f"layers.{{i}}.{rest}"].format(i=idx)
        return self.hf_names[canonical]
