"""Triton Python model ``generate``: text generation with the KV cache over the ONNX decoder model.

Each request is tokenized, then the ``decoder`` model (Triton's onnxruntime backend,
the sq-deploy ONNX graph) is called through BLS: once with the whole prompt and an
empty cache, then once per new token with the ``present.*`` tensors of the previous
step fed back as ``past_key_values.*``. Decoding is greedy, or sampled with
``temperature`` / ``top_k`` / ``seed``; it stops at EOS or ``max_tokens``.
Inputs: ``text_input`` [1] string, optional ``max_tokens`` [1] int32, ``temperature``
[1] fp32, ``top_k`` [1] int32, ``seed`` [1] uint64, ``stream`` [1] bool. Output:
``text_output`` [1] string (the whole completion, or one piece per response when
streaming; the last response carries the final flag). Parameters name the decoder
model and describe its cache.
"""

import numpy as np
import triton_python_backend_utils as pb_utils
from sqdeploy_triton import as_text, load_tokenizer, optional_input, parameters, text_tensor


class TritonPythonModel:
    def initialize(self, args):
        p = parameters(args)
        self.tokenizer = load_tokenizer(args, p)
        self.decoder = p["decoder_model"]
        self.layers, self.kv_heads, self.head_dim = int(p["num_layers"]), int(p["num_kv_heads"]), int(p["head_dim"])
        self.kv_dtype = np.dtype(p["kv_dtype"])
        self.max_tokens, self.max_seq_len = int(p["default_max_tokens"]), int(p["max_seq_len"])
        self.eos = {int(x) for x in p["eos_token_id"].split(",") if x} | {self.tokenizer.eos_token_id}
        self.present = [f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                last = self._generate(request, sender)
            except Exception as exc:  # noqa: BLE001 - report to this client, keep serving the others
                last = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
            sender.send(last, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _step(self, ids, mask, past):
        positions = (np.cumsum(mask, axis=1) - 1)[:, -ids.shape[1]:]
        inputs = [pb_utils.Tensor("input_ids", ids), pb_utils.Tensor("attention_mask", mask),
                  pb_utils.Tensor("position_ids", positions.astype(np.int64))]
        for i in range(self.layers):
            for kv in ("key", "value"):
                inputs.append(pb_utils.Tensor(f"past_key_values.{i}.{kv}", past[f"present.{i}.{kv}"]))
        response = pb_utils.InferenceRequest(
            model_name=self.decoder, inputs=inputs, requested_output_names=["logits", *self.present],
            preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)).exec()
        if response.has_error():
            raise RuntimeError(response.error().message())
        out = {t.name(): t.as_numpy() for t in response.output_tensors()}
        return out["logits"][0, -1].astype(np.float64), {k: out[k] for k in self.present}

    def _generate(self, request, sender):
        prompt = as_text(pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0])
        max_tokens = int(optional_input(pb_utils, request, "max_tokens", [self.max_tokens])[0])
        temperature = float(optional_input(pb_utils, request, "temperature", [0.0])[0])
        top_k = int(optional_input(pb_utils, request, "top_k", [0])[0])
        rng = np.random.default_rng(int(optional_input(pb_utils, request, "seed", [0])[0]))
        stream = bool(optional_input(pb_utils, request, "stream", [False])[0])
        ids = np.array([self.tokenizer.encode(prompt)], dtype=np.int64)
        max_tokens = max(0, min(max_tokens, self.max_seq_len - ids.shape[1]))
        mask = np.ones_like(ids)
        past = {k: np.zeros((1, self.kv_heads, 0, self.head_dim), self.kv_dtype) for k in self.present}
        tokens, sent = [], ""
        for _ in range(max_tokens):
            logits, past = self._step(ids, mask, past)
            token = _pick(logits, temperature, top_k, rng)
            if token in self.eos:
                break
            tokens.append(token)
            ids, mask = np.array([[token]], dtype=np.int64), np.concatenate([mask, [[1]]], axis=1)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if stream and not text.endswith("\ufffd"):  # hold back half a multi-byte character
                sender.send(pb_utils.InferenceResponse(output_tensors=[text_tensor(pb_utils, "text_output", [text[len(sent):]])]))
                sent = text
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return pb_utils.InferenceResponse(output_tensors=[text_tensor(pb_utils, "text_output", [text[len(sent):]])])


def _pick(logits, temperature, top_k, rng):
    """Greedy at temperature 0; otherwise sample from the (top-k) softmax."""
    if temperature <= 0:
        return int(np.argmax(logits))
    if top_k > 0:
        cut = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits < cut, -np.inf, logits)
    p = np.exp((logits - logits.max()) / temperature)
    return int(rng.choice(len(p), p=p / p.sum()))
