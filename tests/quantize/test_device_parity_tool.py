"""``tools/export_device_parity.py``: the tensor-for-tensor comparison it reports."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("device_parity", ROOT / "tools" / "export_device_parity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_counts_moved_integers_in_steps_and_unpacks_int4_words():
    tool = _tool()
    w = torch.tensor([[1, -3, 7], [0, 2, -128]], dtype=torch.int8)
    w2 = w.clone()
    w2[1, 1] = 3  # one value, one step
    packed = torch.tensor([[0x76543210]], dtype=torch.int32)
    packed2 = torch.tensor([[0x76543410]], dtype=torch.int32)  # nibble 2: 2 -> 4, two steps
    a = {"l.weight": w, "l.weight_packed": packed, "l.weight_scale": torch.tensor([1.0, 2.0]), "only.a": torch.zeros(1)}
    b = {"l.weight": w2, "l.weight_packed": packed2, "l.weight_scale": torch.tensor([1.0, 2.002]), "only.b": torch.zeros(1)}
    d = tool.compare(a, b)
    assert d["summary"]["moved"] == 2 and d["summary"]["integer_values"] == 6 + 8
    assert d["summary"]["max_steps"] == 2 and d["integer"]["l.weight"] == {"moved": 1, "of": 6, "max_steps": 1}
    assert abs(d["summary"]["float_max_rel"] - 0.001) < 1e-6 and d["summary"]["float_worst"] == "l.weight_scale"
    assert d["only_in_first"] == ["only.a"] and d["only_in_second"] == ["only.b"]
    assert tool.unpack_nibbles(packed).tolist() == [[0, 1, 2, 3, 4, 5, 6, 7]]
    same = tool.compare(a, a)["summary"]
    assert same["moved"] == 0 and same["float_max_rel"] == 0.0
