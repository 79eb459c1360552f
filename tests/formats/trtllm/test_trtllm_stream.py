"""Rank files written layer by layer: the same bytes as safetensors' save_file, read back one tensor at a time."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from sqdeploy.core.errors import SqDeployError
from sqdeploy.formats.trtllm.stream import Entry, PlannedFile, RankFiles, entry_of, iter_tensors

PREFIX = "transformer.layers.{i}."


def _globals(rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    return {
        "transformer.vocab_embedding.weight": torch.randn(10, 8, generator=g).half(),
        "lm_head.weight": torch.randn(5, 8, generator=g).half(),
        "transformer.ln_f.weight": torch.randn(8, generator=g).half(),
    }


def _layer(i: int, rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * i + rank)
    p = PREFIX.format(i=i)
    return {
        f"{p}attention.qkv.weight": torch.randint(-127, 128, (12, 8), generator=g, dtype=torch.int8),
        f"{p}attention.qkv.per_channel_scale": torch.rand(12, generator=g),
        f"{p}attention.qkv.act_scale": torch.rand((), generator=g),
        f"{p}mlp.fc.weight": torch.randint(-8, 8, (4, 3), generator=g, dtype=torch.int32),
        f"{p}input_layernorm.weight": torch.randn(8, generator=g).bfloat16(),
        f"{p}mlp.gate.bias": torch.zeros(0),
        f"{p}post_layernorm.mask": torch.rand(5, generator=g) > 0.5,
        f"{p}mlp.proj.zeros": torch.randint(0, 255, (3, 2), generator=g, dtype=torch.uint8),
    }


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_planned_file_bytes_equal_save_file(tmp_path, metadata):
    tensors = {**_globals(0), **_layer(0, 0), **_layer(11, 0), **_layer(2, 0)}
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata=metadata)
    f = PlannedFile(tmp_path / "new.safetensors", [entry_of(n, t) for n, t in tensors.items()], metadata)
    for name in reversed(list(tensors)):  # any order
        f.write(name, tensors[name])
    f.close()
    assert (tmp_path / "new.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_rank_files_equal_save_file_per_rank(tmp_path):
    tp, layers, meta = 2, 12, {"format": "pt"}
    files = RankFiles(tmp_path, [_globals(r) for r in range(tp)], layers, PREFIX, meta)
    for i in range(layers):
        files.add_layer([_layer(i, r) for r in range(tp)])
    files.close()
    for r in range(tp):
        ref = {**_globals(r), **{k: v for i in range(layers) for k, v in _layer(i, r).items()}}
        save_file(ref, str(tmp_path / f"ref{r}.safetensors"), metadata=meta)
        assert (tmp_path / f"rank{r}.safetensors").read_bytes() == (tmp_path / f"ref{r}.safetensors").read_bytes()


def test_a_layer_unlike_the_first_is_refused(tmp_path):
    files = RankFiles(tmp_path, [_globals(0)], 2, PREFIX)
    files.add_layer([_layer(0, 0)])
    odd = _layer(1, 0)
    odd[PREFIX.format(i=1) + "mlp.fc.weight"] = torch.zeros(4, 4, dtype=torch.int32)
    with pytest.raises(SqDeployError, match="planned"):
        files.add_layer([odd])


def test_a_missing_layer_is_refused_at_close(tmp_path):
    files = RankFiles(tmp_path, [_globals(0)], 3, PREFIX)
    files.add_layer([_layer(0, 0)])
    with pytest.raises(SqDeployError, match="never written"):
        files.close()


def test_iter_tensors_reads_what_load_file_reads(tmp_path):
    tensors = {**_globals(1), **_layer(3, 1)}
    save_file(tensors, str(tmp_path / "a.safetensors"))
    ref = load_file(str(tmp_path / "a.safetensors"))
    got = dict(iter_tensors(tmp_path / "a.safetensors"))
    assert set(got) == set(ref)
    for name, t in ref.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and torch.equal(got[name], t), name


def test_entry_sizes():
    assert Entry("x", "BF16", (3, 4)).nbytes == 24
    assert Entry("s", "F32", ()).nbytes == 4
