"""``algorithm: none``: the layers pass through in float (the fp16/fp32 baselines every variant is compared with)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqdeploy.quantize.algorithm import Algorithm
from sqdeploy.quantize.streaming import LayerResult


@dataclass(frozen=True)
class PassthroughConfig:
    """No keys: nothing is rounded."""

    def params(self) -> dict[str, Any]:
        return {}

    def check(self, origin: str, name: str, scheme) -> None:
        pass


class Passthrough:
    name = "float"
    needs_quant_stream = False

    def quantize_layer(self, block, data) -> LayerResult:
        return LayerResult()


ALGORITHM = Algorithm("none", PassthroughConfig, lambda config, scheme, cfg, groups: Passthrough(), quantizes=False)
