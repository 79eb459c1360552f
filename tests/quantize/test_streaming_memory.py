"""Where the streaming driver keeps what it computes: on the layer's device, and nothing per layer.

The calibration activations, statistics and GPTQ sums of a GPU export must stay on the GPU
(a host copy per batch is what made large exports slow), which these tests check on the
``meta`` device: every tensor operation works there, but copying a tensor to the host fails,
so a host round trip anywhere on the path raises. Host memory must not grow with depth:
the tensors the driver and the pipeline hold after each layer are counted on models of 2
and 6 layers.
"""

from __future__ import annotations

import gc

import pytest
import torch

from sqdeploy.model.checkpoint import HFCheckpoint
from sqdeploy.model.loading import load_block, load_model
from sqdeploy.model.transformer import Context
from sqdeploy.quantize.gptq import act_aware_sums
from sqdeploy.quantize.pipeline import Calibration, Runtime, quantize, smoothing_groups
from sqdeploy.quantize.recipes import load_recipe
from sqdeploy.quantize.smoothing import smooth_block, smoothquant_scale
from sqdeploy.quantize.streaming import StatsCollector, embed_chunks, run_block, run_block_in_place
from sqdeploy.testing.random_model import make_random_model

META = torch.device("meta")


def _meta_layer(model_dir):
    ck = HFCheckpoint(model_dir)
    head = load_model(ck, with_layers=False, with_head=False)
    x, ctx = embed_chunks(head, torch.randint(3, 100, (4, 16)), 2, META)
    ctx = Context(mask=ctx.mask.to(META), cos=ctx.cos.to(META), sin=ctx.sin.to(META))
    return ck, load_block(ck, 0, torch.float32, META), x, ctx


def test_calibration_statistics_and_sums_stay_on_the_device(tiny_models):
    ck, block, x, ctx = _meta_layer(tiny_models["llama"])
    assert all(c.device == META for c in x)
    with StatsCollector(block, ck.config.linears, hessian=True) as collector:
        y = run_block(block, x, ctx, META)
    assert all(t.device == META for t in y)
    assert collector.kv_amax.device == META
    for name, st in collector.stats.items():
        assert (st.absmax.device, st.abssum.device, st.xtx.device) == (META, META, META), name
        assert st.xtx.dtype == torch.float64 and st.hessian.device == META
    groups = smoothing_groups(load_recipe("w8a8-sq-o1"), ck.family, ck.config)
    scales, smoothed = smooth_block(block, ck.config, groups, collector.stats,
                                    lambda g, xs, _m, w: smoothquant_scale(xs, w, 0.5))
    assert scales and all(s.device == META for s in scales.values())
    assert all(st.xtx.device == META for st in smoothed.values())
    run_block_in_place(block, y, ctx, META)
    assert all(t.device == META for t in y)


def test_activation_aware_sums_stay_on_the_device():
    xs = [{"q": torch.empty(32, 8, device=META)} for _ in range(2)]
    sums = act_aware_sums(((x, x) for x in xs), lambda name, t: t * 2)
    cross, hq = sums["q"]
    assert cross.device == META and hq.device == META


def _held_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage alive in the process (the pipeline's holdings)."""
    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type != "cpu":
                continue
            st = obj.untyped_storage()
        except Exception:  # noqa: BLE001 - objects that only look like tensors
            continue
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


@pytest.mark.parametrize("recipe", ["w8a8-sq-o1", "w4a16-rtn:rounding=gptq"])
def test_memory_held_between_layers_does_not_grow_with_depth(tmp_path, calib_file, recipe):
    """What is alive when the last layer is handed over: the same for 2 layers as for 6."""
    from tests.conftest import SHARED_MODEL

    held = {}
    for layers in (2, 6):
        model = make_random_model("llama", tmp_path / f"L{layers}", num_hidden_layers=layers,
                                  tokenizer_from=SHARED_MODEL if SHARED_MODEL.exists() else None)
        sizes: list[int] = []
        quantize(model, recipe, Calibration(str(calib_file), 4, 64), Runtime(progress=False),
                 on_layer=lambda _record, sizes=sizes: sizes.append(_held_tensor_bytes()))
        held[layers] = sizes
    layer_bytes = sum(p.numel() * 4 for p in load_block(HFCheckpoint(tmp_path / "L2"), 0).parameters())
    assert held[6][-1] - held[2][-1] < 0.05 * layer_bytes, (held, layer_bytes)
    assert max(held[6][1:]) - min(held[6][1:]) < 0.05 * layer_bytes, (held, layer_bytes)


def test_an_accelerator_is_sent_the_stored_float16_and_widens_it_itself(tmp_path, monkeypatch):
    """A float16 checkpoint's layer crosses to the device as float16 (half the bytes of float32, no host
    conversion); on the CPU the float32 copy is made by the reader as before, with the same values."""
    ck = HFCheckpoint(make_random_model("llama", tmp_path / "m", dtype=torch.float16))
    on_cpu = load_block(ck, 0, torch.float32, "cpu")
    assert all(p.dtype == torch.float32 for p in on_cpu.parameters())
    assert torch.equal(on_cpu.linear("q").weight, ck.get("layers.0.q.weight", torch.float16).float())

    def no_host_conversion(self, canonical, dtype=torch.float32):
        raise AssertionError(f"{canonical} converted to {dtype} on the host")

    monkeypatch.setattr(HFCheckpoint, "get", no_host_conversion)
    on_device = load_block(ck, 0, torch.float32, META)
    assert all(p.dtype == torch.float32 and p.device == META for p in on_device.parameters())
    head = load_model(ck, with_layers=False, device=META)
    assert head.embed.weight.device == META and head.lm_head.weight.dtype == torch.float32
