"""A tiny decoder graph with exactly the sq-deploy ONNX interface.

It does real KV-cache attention (past keys and values concatenated with the new ones,
padding and causal masks, learned positions, one attention block per layer, an LM
head) with random weights, so engines, Triton repositories and servers can be
exercised end to end, and prefill + decode can be checked against one full pass,
in a second and without exporting a model. ``python -m sqdeploy.testing.tiny_onnx
OUT [--tokenizer-from MODEL_DIR]`` writes one.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from sqdeploy.formats.onnx.contract import GRAPH, META, META_FORMAT

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "generation_config.json")


def _attention_bias(h, past_name: str) -> None:
    """bias [B, 1, S, T]: 0 where query s may see key t (t <= past + s, mask 1), else -1e9."""
    h.node("Shape", [past_name], ["past_shape"])
    h.node("Gather", ["past_shape", "c_two"], ["past_len"], axis=0)
    h.node("Shape", ["input_ids"], ["ids_shape"])
    h.node("Gather", ["ids_shape", "c_one"], ["seq_len"], axis=0)
    h.node("Add", ["past_len", "seq_len"], ["total_len"])
    h.node("Range", ["past_len", "total_len", "c_one"], ["q_pos"])
    h.node("Range", ["c_zero", "total_len", "c_one"], ["k_pos"])
    h.node("Unsqueeze", ["q_pos", "c_axis1"], ["q_col"])
    h.node("Unsqueeze", ["k_pos", "c_axis0"], ["k_row"])
    h.node("LessOrEqual", ["k_row", "q_col"], ["allowed"])
    h.node("Where", ["allowed", "c_f0", "c_fneg"], ["causal_bias"])
    h.node("Cast", ["attention_mask"], ["mask_f"], to=1)
    h.node("Sub", ["c_f1", "mask_f"], ["unmasked"])
    h.node("Mul", ["unmasked", "c_fneg"], ["pad_bias2"])
    h.node("Unsqueeze", ["pad_bias2", "c_axes12"], ["pad_bias"])
    h.node("Add", ["pad_bias", "causal_bias"], ["attn_bias"])


class _Graph:
    def __init__(self):
        self.nodes, self.inits = [], []

    def node(self, op, ins, outs, **attrs):
        import onnx

        self.nodes.append(onnx.helper.make_node(op, ins, outs, **attrs))

    def init(self, name, array):
        import onnx

        self.inits.append(onnx.numpy_helper.from_array(np.asarray(array), name))


def _attention_layer(g, i: int, hidden: int, w) -> None:
    """x_{i+1} = x_i + o(softmax(q k^T / sqrt(d) + bias) v), with k and v appended to the past."""
    x = f"x_{i}"
    for p in ("q", "k", "v"):
        g.init(f"w{p}_{i}", w(hidden, hidden))
        g.node("MatMul", [x, f"w{p}_{i}"], [f"{p}_flat_{i}"])
        g.node("Reshape", [f"{p}_flat_{i}", "c_heads"], [f"{p}_bshd_{i}"])
        g.node("Transpose", [f"{p}_bshd_{i}"], [f"{p}_{i}"], perm=[0, 2, 1, 3])
    g.node("Concat", [f"past_key_values.{i}.key", f"k_{i}"], [f"present.{i}.key"], axis=2)
    g.node("Concat", [f"past_key_values.{i}.value", f"v_{i}"], [f"present.{i}.value"], axis=2)
    g.node("Transpose", [f"present.{i}.key"], [f"kt_{i}"], perm=[0, 1, 3, 2])
    g.node("MatMul", [f"q_{i}", f"kt_{i}"], [f"qk_{i}"])
    g.node("Mul", [f"qk_{i}", "c_scale"], [f"qk_scaled_{i}"])
    g.node("Add", [f"qk_scaled_{i}", "attn_bias"], [f"scores_{i}"])
    g.node("Softmax", [f"scores_{i}"], [f"probs_{i}"], axis=-1)
    g.node("MatMul", [f"probs_{i}", f"present.{i}.value"], [f"ctx_{i}"])
    g.node("Transpose", [f"ctx_{i}"], [f"ctx_bshd_{i}"], perm=[0, 2, 1, 3])
    g.node("Reshape", [f"ctx_bshd_{i}", "c_merge"], [f"ctx_flat_{i}"])
    g.init(f"wo_{i}", w(hidden, hidden))
    g.node("MatMul", [f"ctx_flat_{i}", f"wo_{i}"], [f"attn_out_{i}"])
    g.node("Add", [x, f"attn_out_{i}"], [f"x_{i + 1}"])


def build_tiny_decoder(num_layers: int = 2, heads: int = 2, head_dim: int = 8, vocab: int = 8192,
                       max_positions: int = 256, seed: int = 0):
    """The ONNX ModelProto of a random tiny decoder (float32, multi-head attention)."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    hidden = heads * head_dim
    g = _Graph()

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    consts = {"c_zero": 0, "c_one": 1, "c_two": 2}
    for k, v in consts.items():
        g.init(k, np.array(v, dtype=np.int64))
    g.init("c_axis0", np.array([0], dtype=np.int64))
    g.init("c_axis1", np.array([1], dtype=np.int64))
    g.init("c_axes12", np.array([1, 2], dtype=np.int64))
    g.init("c_f0", np.array(0.0, dtype=np.float32))
    g.init("c_f1", np.array(1.0, dtype=np.float32))
    g.init("c_fneg", np.array(-1e9, dtype=np.float32))
    g.init("c_scale", np.array(1.0 / np.sqrt(head_dim), dtype=np.float32))
    g.init("c_heads", np.array([0, 0, heads, head_dim], dtype=np.int64))
    g.init("c_merge", np.array([0, 0, hidden], dtype=np.int64))
    g.init("embed", w(vocab, hidden))
    g.init("pos_embed", w(max_positions, hidden))
    g.init("lm_head", w(hidden, vocab))
    g.node("Gather", ["embed", "input_ids"], ["tok"])
    g.node("Gather", ["pos_embed", "position_ids"], ["pos"])
    g.node("Add", ["tok", "pos"], ["x_0"])
    _attention_bias(g, "past_key_values.0.key")
    for i in range(num_layers):
        _attention_layer(g, i, hidden, w)
    g.node("MatMul", [f"x_{num_layers}", "lm_head"], ["logits"])

    def io(name, elem, dims):
        return helper.make_tensor_value_info(name, elem, dims)

    kv_in = ["batch", heads, "past_sequence", head_dim]
    kv_out = ["batch", heads, "past_sequence + sequence", head_dim]
    inputs = [io("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              io("attention_mask", TensorProto.INT64, ["batch", "past_sequence + sequence"]),
              io("position_ids", TensorProto.INT64, ["batch", "sequence"])]
    outputs = [io("logits", TensorProto.FLOAT, ["batch", "sequence", vocab])]
    for i in range(num_layers):
        inputs += [io(f"past_key_values.{i}.{kv}", TensorProto.FLOAT, kv_in) for kv in ("key", "value")]
        outputs += [io(f"present.{i}.{kv}", TensorProto.FLOAT, kv_out) for kv in ("key", "value")]
    graph = helper.make_graph(g.nodes, "tiny_decoder", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="sq-deploy")
    onnx.checker.check_model(model, full_check=True)
    return model


def write_tiny_onnx_dir(out: str | Path, tokenizer_from: str | Path | None = None, num_layers: int = 2,
                        heads: int = 2, head_dim: int = 8, vocab: int = 8192, external_data: bool = True,
                        variant: str = "onnxruntime") -> Path:
    """Write an ONNX export directory (graph, description, tokenizer files) for a tiny decoder."""
    import onnx

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_tiny_decoder(num_layers, heads, head_dim, vocab)
    onnx.save_model(model, str(out / GRAPH), save_as_external_data=external_data,
                    location=f"{GRAPH}.data", size_threshold=1024)
    meta = {
        "format": META_FORMAT, "family": "tiny", "num_layers": num_layers, "num_heads": heads, "num_kv_heads": heads,
        "head_dim": head_dim, "hidden_size": heads * head_dim, "vocab_size": vocab, "max_positions": 256,
        "dtype": "float32", "variant": variant, "int4_format": None, "quantization": None,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "inputs": [i.name for i in model.graph.input], "outputs": [o.name for o in model.graph.output],
    }
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_from) / name).exists():
                shutil.copy(Path(tokenizer_from) / name, out / name)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sqdeploy.testing.tiny_onnx", description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--tokenizer-from", default=None, help="copy the tokenizer files of this model directory")
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args(argv)
    print(write_tiny_onnx_dir(args.out, args.tokenizer_from, num_layers=args.layers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
