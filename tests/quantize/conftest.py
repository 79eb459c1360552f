"""A tiny model with the activation outliers that smoothing and AWQ exist for."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file, save_file

OUTLIER_CHANNELS = (3, 17, 40, 77)
OUTLIER_GAIN = 40.0


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory, tiny_models):
    """The tiny Llama with a few norm output channels made 40x larger and the consumers' weight columns
    40x smaller: the same function, with the activation outliers smoothing exists for."""
    src = tiny_models["llama"]
    out = tmp_path_factory.mktemp("outliers") / "llama"
    out.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    ch = list(OUTLIER_CHANNELS)
    for key in list(tensors):
        for norm, consumers in (("input_layernorm", ("q_proj", "k_proj", "v_proj")),
                                ("post_attention_layernorm", ("gate_proj", "up_proj"))):
            if key.endswith(f"{norm}.weight"):
                prefix = key[: -len(f"{norm}.weight")]
                tensors[key] = tensors[key].clone()
                tensors[key][ch] *= OUTLIER_GAIN
                for c in consumers:
                    name = f"{prefix}{'self_attn' if c[0] in 'qkv' else 'mlp'}.{c}.weight"
                    tensors[name] = tensors[name].clone()
                    tensors[name][:, ch] /= OUTLIER_GAIN
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out
