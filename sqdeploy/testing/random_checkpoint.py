"""Llama checkpoints of real shapes with random float16 weights, written one layer at a time.

Export speed and memory depend on the shapes and the files, not on the values, so the
export benchmark needs no 13-26 GB download. Each decoder layer goes into its own
safetensors shard as soon as it is drawn (on the GPU when there is one), so making a
70B-shaped checkpoint needs the memory of one layer. A shallower model of the same shape
(``with_layers``) hard-links the first shards of a deeper one instead of writing them
again. The tokenizer is a word-level one over ``w<id>`` words, made here, so the
calibration text can be random token ids (:func:`random_prompts`).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch
from safetensors.torch import save_file

from sqdeploy.testing.random_weights import LLAMA2_7B

LLAMA2_13B = {**LLAMA2_7B, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
              "num_attention_heads": 40, "num_key_value_heads": 40}
LLAMA2_70B = {**LLAMA2_7B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64, "num_key_value_heads": 8}
SMALL = {**LLAMA2_7B, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 4096}
SHAPES = {"7b": LLAMA2_7B, "13b": LLAMA2_13B, "70b": LLAMA2_70B, "small": SMALL}
SPECIAL = ("<unk>", "<s>", "</s>")
WEIGHT_STD = 0.02


def layer_shapes(hf: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor name (without the ``model.layers.{i}.`` prefix) -> shape, for one Llama layer."""
    h, inter = hf["hidden_size"], hf["intermediate_size"]
    hd = h // hf["num_attention_heads"]
    kv = hf["num_key_value_heads"] * hd
    return {
        "self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, h), "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h),
        "mlp.down_proj.weight": (h, inter), "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
    }


def checkpoint_bytes(hf: dict, layers: int) -> int:
    """float16 bytes of the checkpoint's tensors."""
    per_layer = sum(_numel(s) for s in layer_shapes(hf).values())
    globals_ = 2 * hf["vocab_size"] * hf["hidden_size"] + hf["hidden_size"]
    return 2 * (per_layer * layers + globals_)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _draw(shape: tuple[int, ...], std: float, mean: float, gen: torch.Generator, device: str) -> torch.Tensor:
    t = torch.randn(*shape, generator=gen, device=device, dtype=torch.float32 if device == "cpu" else torch.float16)
    return (t * std + mean).to(torch.float16).cpu()


def _layer_file(i: int) -> str:
    return f"model-layer-{i:05d}.safetensors"


GLOBAL_FILE = "model-globals.safetensors"


def write_random_llama(out: str | Path, hf: dict, layers: int, seed: int = 0, device: str | None = None) -> Path:
    """A Llama directory with ``layers`` random layers of shape ``hf`` (config, shards, index, tokenizer)."""
    return extend_random_llama(out, hf, 0, layers, seed, device)


def extend_random_llama(out: str | Path, hf: dict, have: int, layers: int, seed: int = 0, device: str | None = None) -> Path:
    """Grow the random checkpoint ``out`` from ``have`` to ``layers`` layers (``have = 0``: make it).

    Every layer is drawn from its own seed, so a checkpoint grown in steps holds the same
    tensors as one written at once."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    h = hf["hidden_size"]
    if have == 0:
        gen = torch.Generator(device=device).manual_seed(seed)
        globals_ = {
            "model.embed_tokens.weight": _draw((hf["vocab_size"], h), 1.0, 0.0, gen, device),
            "model.norm.weight": _draw((h,), 0.05, 1.0, gen, device),
            "lm_head.weight": _draw((hf["vocab_size"], h), WEIGHT_STD, 0.0, gen, device),
        }
        save_file(globals_, str(out / GLOBAL_FILE), metadata={"format": "pt"})
        weight_map = {name: GLOBAL_FILE for name in globals_}
        del globals_
    else:
        weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for i in range(have, layers):
        gen = torch.Generator(device=device).manual_seed(seed * 100_003 + i + 1)
        tensors = {}
        for name, shape in layer_shapes(hf).items():
            norm = len(shape) == 1
            tensors[f"model.layers.{i}.{name}"] = _draw(shape, 0.05 if norm else WEIGHT_STD, 1.0 if norm else 0.0, gen, device)
        save_file(tensors, str(out / _layer_file(i)), metadata={"format": "pt"})
        weight_map.update({name: _layer_file(i) for name in tensors})
        del tensors
    _finish(out, hf, layers, weight_map)
    return out


def with_layers(src: str | Path, out: str | Path, layers: int) -> Path:
    """The first ``layers`` layers of the random checkpoint ``src`` (shards hard-linked, else copied)."""
    src, out = Path(src), Path(out)
    hf = json.loads((src / "config.json").read_text())
    if layers > hf["num_hidden_layers"]:
        raise ValueError(f"{src} has {hf['num_hidden_layers']} layers, fewer than {layers}")
    out.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    for name, file in index.items():
        if file == GLOBAL_FILE or int(file.split("-")[-1].split(".")[0]) < layers:
            weight_map[name] = file
    for file in sorted(set(weight_map.values())):
        _link(src / file, out / file)
    _finish(out, hf, layers, weight_map)
    return out


def _link(a: Path, b: Path) -> None:
    if b.exists():
        return
    try:
        os.link(a, b)
    except OSError:
        import shutil

        shutil.copyfile(a, b)


def _finish(out: Path, hf: dict, layers: int, weight_map: dict[str, str]) -> None:
    config = {**hf, "num_hidden_layers": layers, "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 2}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    total = sum((out / f).stat().st_size for f in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    write_word_tokenizer(out, hf["vocab_size"])


def write_word_tokenizer(out: Path, vocab_size: int) -> None:
    """A word-level tokenizer: ``<unk> <s> </s>`` then ``w3 .. w{vocab_size-1}`` (whitespace-split)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
           "model_max_length": 4096, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1) + "\n")


def random_prompts(path: str | Path, vocab_size: int, texts: int = 160, words: int = 520, seed: int = 0) -> Path:
    """A JSONL calibration file of ``texts`` records of ``words`` random words each (one token per word)."""
    rng = random.Random(seed)
    path = Path(path)
    with path.open("w") as f:
        for _ in range(texts):
            text = " ".join(f"w{rng.randrange(len(SPECIAL), vocab_size)}" for _ in range(words))
            f.write(json.dumps({"text": text}) + "\n")
    return path
