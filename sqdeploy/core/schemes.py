"""Quantization schemes as frozen values.

A scheme says *what* is quantized and at which granularity; the arithmetic lives in
:mod:`sqdeploy.core.qmath`. Nothing mutates a scheme during a run: algorithms
and writers read it, the manifest records it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sqdeploy.core.errors import SqDeployError

WEIGHT_GRANULARITIES = ("tensor", "channel", "group")
ACT_KINDS = ("none", "static_tensor", "dynamic_tensor", "dynamic_token")


@dataclass(frozen=True)
class WeightScheme:
    """Integer weights: ``bits`` wide, one scale per tensor, output channel or group.

    Groups run along the input dimension (``group_size`` consecutive input channels
    of one output row share a scale), as in AWQ, GPTQ and SmoothQuant+.
    """

    bits: int
    granularity: str
    group_size: int | None = None
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise SqDeployError(f"weight bits must be 4 or 8, got {self.bits}")
        if self.granularity not in WEIGHT_GRANULARITIES:
            raise SqDeployError(f"weight granularity must be one of {WEIGHT_GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "group":
            if self.group_size not in (32, 64, 128, 256):
                raise SqDeployError(f"group_size must be 32, 64, 128 or 256, got {self.group_size}")
        elif self.group_size is not None:
            raise SqDeployError("group_size is only meaningful with granularity 'group'")

    @property
    def qmin(self) -> int:
        return 0 if not self.symmetric else -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1 if not self.symmetric else (1 << (self.bits - 1)) - 1

    def check_shape(self, name: str, out_features: int, in_features: int) -> None:
        if self.granularity == "group" and in_features % self.group_size:
            raise SqDeployError(
                f"{name}: in_features {in_features} is not a multiple of group_size {self.group_size}; "
                f"choose a group size that divides it (32, 64 or 128)"
            )

    def describe(self) -> str:
        g = f"g{self.group_size}" if self.granularity == "group" else self.granularity
        return f"int{self.bits}-{g}-{'sym' if self.symmetric else 'asym'}"


@dataclass(frozen=True)
class ActScheme:
    """INT8 activations: none, static per-tensor (calibrated), dynamic per-tensor or per-token."""

    kind: str = "none"
    bits: int = 8

    def __post_init__(self) -> None:
        if self.kind not in ACT_KINDS:
            raise SqDeployError(f"activation scheme must be one of {ACT_KINDS}, got {self.kind!r}")
        if self.kind != "none" and self.bits != 8:
            raise SqDeployError("only 8-bit activations are supported")

    @property
    def quantized(self) -> bool:
        return self.kind != "none"

    @property
    def static(self) -> bool:
        return self.kind == "static_tensor"


@dataclass(frozen=True)
class QuantScheme:
    """What happens to every quantized linear: its weights and its input activations."""

    weight: WeightScheme | None
    act: ActScheme = ActScheme()

    @property
    def is_float(self) -> bool:
        return self.weight is None

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        if self.weight is None:
            return "float"
        a = {"none": "a16", "static_tensor": "a8-static", "dynamic_tensor": "a8-dyn-tensor", "dynamic_token": "a8-per-token"}
        return f"w{self.weight.bits}{a[self.act.kind]} ({self.weight.describe()})"


_W8_TENSOR = WeightScheme(8, "tensor")
_W8_CHANNEL = WeightScheme(8, "channel")

# SmoothQuant's efficiency levels (Table 2 of the paper) plus the per-channel layouts
PRESETS: dict[str, QuantScheme] = {
    "O1": QuantScheme(_W8_TENSOR, ActScheme("dynamic_token")),
    "O2": QuantScheme(_W8_TENSOR, ActScheme("dynamic_tensor")),
    "O3": QuantScheme(_W8_TENSOR, ActScheme("static_tensor")),
    "w8a8-channel-static": QuantScheme(_W8_CHANNEL, ActScheme("static_tensor")),
    "w8a8-channel-token": QuantScheme(_W8_CHANNEL, ActScheme("dynamic_token")),
    "w8a16": QuantScheme(_W8_CHANNEL),
    "w4a16-g128-asym": QuantScheme(WeightScheme(4, "group", 128, symmetric=False)),
    "w4a16-g128-sym": QuantScheme(WeightScheme(4, "group", 128, symmetric=True)),
}


def preset(name: str) -> QuantScheme:
    if name not in PRESETS:
        raise SqDeployError(f"unknown scheme preset '{name}'; known: {', '.join(PRESETS)}")
    return PRESETS[name]
