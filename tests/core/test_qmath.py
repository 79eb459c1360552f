"""Quantize/dequantize round trips of every scheme, and the on-disk encoding."""

import pytest
import torch

from sqdeploy.core import qmath
from sqdeploy.core.errors import SqDeployError
from sqdeploy.core.schemes import PRESETS, ActScheme, QuantScheme, WeightScheme
from sqdeploy.quantize.qmodel import decode_linear, encode_linear

SCHEMES = [
    WeightScheme(8, "tensor"),
    WeightScheme(8, "channel"),
    WeightScheme(4, "group", 32, symmetric=True),
    WeightScheme(4, "group", 64, symmetric=False),
    WeightScheme(4, "group", 128, symmetric=False),
    WeightScheme(4, "channel", symmetric=False),
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_weight_round_trip(scheme):
    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.linspace(0.1, 4, 256)
    qw = qmath.quantize_weight(w, scheme)
    assert qw.q.dtype == torch.int8
    assert int(qw.q.min()) >= scheme.qmin and int(qw.q.max()) <= scheme.qmax
    deq = qmath.dequantize_weight(qw, scheme)
    # round to nearest: every element within half a step of its group's scale
    groups = qmath.num_groups(scheme, 256)
    step = qw.scale.expand(64, groups).repeat_interleave(256 // groups, dim=1) if scheme.granularity != "tensor" else qw.scale
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    # quantizing the dequantized weight again is exact (a fixed point of the grid)
    again = qmath.quantize_weight_with(deq, scheme, qw.scale, qw.zero)
    assert torch.equal(again.q, qw.q)


def test_symmetric_int4_uses_amax_over_7():
    w = torch.tensor([[7.0, -3.5, 1.0, 0.0] * 8])
    qw = qmath.quantize_weight(w, WeightScheme(4, "group", 32, True))
    assert qw.scale.item() == pytest.approx(1.0)
    assert qw.q[0, :4].tolist() == [7, -4, 1, 0]  # -3.5 rounds half to even


def test_asymmetric_zero_point_matches_paper_equation():
    w = torch.linspace(-1, 2, 32)[None]
    qw = qmath.quantize_weight(w, WeightScheme(4, "group", 32, False))
    scale = 3.0 / 15
    assert qw.scale.item() == pytest.approx(scale)
    assert qw.zero.item() == round(1.0 / scale)
    assert qw.q.min() == 0 and qw.q.max() == 15


def test_group_size_must_divide():
    with pytest.raises(SqDeployError, match="not a multiple of group_size 128"):
        qmath.quantize_weight(torch.randn(8, 200), WeightScheme(4, "group", 128, False))


def test_static_activation_fake_quant_saturates_like_onnx():
    x = torch.tensor([0.0, 0.5, 1.27, 5.0, -5.0])
    scale = torch.tensor(0.01)
    out = qmath.fake_quant_act(x, ActScheme("static_tensor"), scale)
    assert out.tolist() == pytest.approx([0.0, 0.5, 1.27, 1.27, -1.28])


def test_per_token_scales_each_row():
    x = torch.tensor([[1.0, -0.5], [100.0, 50.0]])
    out = qmath.fake_quant_act(x, ActScheme("dynamic_token"))
    assert out[0, 0] == pytest.approx(1.0) and out[1, 0] == pytest.approx(100.0)


@pytest.mark.parametrize("scheme", SCHEMES[:5], ids=lambda s: s.describe())
def test_compressed_tensors_encoding_round_trip(tmp_path, scheme):
    from safetensors.torch import save_file

    from sqdeploy.model.checkpoint import SafetensorsFiles

    torch.manual_seed(1)
    w = torch.randn(48, 256)
    qs = QuantScheme(scheme, ActScheme("static_tensor"))
    qw = qmath.quantize_weight(w, scheme)
    tensors = encode_linear("m.l", qw, qs, torch.tensor(0.25))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    back = decode_linear(SafetensorsFiles(tmp_path), "m.l", qs)
    assert torch.equal(back.q, qw.q)
    assert torch.equal(back.scale.reshape(qw.scale.shape), qw.scale)
    if qw.zero is not None:
        assert torch.equal(back.zero, qw.zero)
    if scheme.bits == 4:
        assert tensors["m.l.weight_packed"].dtype == torch.int32


def test_presets_cover_smoothquant_levels():
    assert PRESETS["O1"].act.kind == "dynamic_token" and PRESETS["O1"].weight.granularity == "tensor"
    assert PRESETS["O2"].act.kind == "dynamic_tensor"
    assert PRESETS["O3"].act.kind == "static_tensor"


def test_schemes_are_frozen():
    s = WeightScheme(8, "channel")
    with pytest.raises(Exception):
        s.bits = 4  # type: ignore[misc]
