"""Triton Python model ``tensorrt_llm`` for a Hugging Face checkpoint, through TensorRT-LLM's LLM API.

TensorRT-LLM 1.x loads the checkpoint with its PyTorch backend (no engine build).
``model.yaml`` beside this file holds the ``LLM(...)`` arguments (``model``,
``backend``, ``tensor_parallel_size``, ``kv_cache_config``, ...) and ``triton_config``.
Inputs (the names of TensorRT-LLM's own LLM-API model): ``text_input`` [-1] string,
optional ``streaming`` [1] bool and ``sampling_param_{max_tokens, temperature, top_k,
top_p, seed}``. Outputs: ``text_output`` [-1] string, ``finish_reason`` [-1] string.
In decoupled mode a streaming request gets one response per generated piece of text.
"""

import os

import triton_python_backend_utils as pb_utils
import yaml
from sqdeploy_triton import as_text, text_tensor

SAMPLING = {"max_tokens": int, "temperature": float, "top_k": int, "top_p": float, "seed": int}


class TritonPythonModel:
    def initialize(self, args):
        from tensorrt_llm import LLM

        with open(os.path.join(args["model_repository"], args["model_version"], "model.yaml")) as f:
            settings = yaml.safe_load(f)
        self.decoupled = bool(settings.pop("triton_config", {}).get("decoupled", False))
        kv = settings.pop("kv_cache_config", None)
        if kv is not None:
            from tensorrt_llm.llmapi import KvCacheConfig

            settings["kv_cache_config"] = KvCacheConfig(**kv)
        self.llm = LLM(**settings)

    def _sampling(self, request):
        from tensorrt_llm import SamplingParams

        kwargs = {}
        for key, cast in SAMPLING.items():
            tensor = pb_utils.get_input_tensor_by_name(request, f"sampling_param_{key}")
            if tensor is not None:
                kwargs[key] = cast(tensor.as_numpy().reshape(-1)[0])
        return SamplingParams(**kwargs)

    def execute(self, requests):
        responses = []
        for request in requests:
            prompt = as_text(pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0])
            stream = pb_utils.get_input_tensor_by_name(request, "streaming")
            streaming = self.decoupled and stream is not None and bool(stream.as_numpy().reshape(-1)[0])
            try:
                if streaming:
                    self._stream(request, prompt)
                    continue
                out = self.llm.generate(prompt, self._sampling(request)).outputs[0]
                response = pb_utils.InferenceResponse(output_tensors=[
                    text_tensor(pb_utils, "text_output", [out.text]), text_tensor(pb_utils, "finish_reason", [str(out.finish_reason)])])
            except Exception as exc:  # noqa: BLE001 - report to this client, keep serving the others
                response = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
            if self.decoupled:
                request.get_response_sender().send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            else:
                responses.append(response)
        return None if self.decoupled else responses

    def _stream(self, request, prompt):
        sender = request.get_response_sender()
        for result in self.llm.generate_async(prompt, self._sampling(request), streaming=True):
            out = result.outputs[0]
            sender.send(pb_utils.InferenceResponse(output_tensors=[
                text_tensor(pb_utils, "text_output", [out.text_diff]),
                text_tensor(pb_utils, "finish_reason", [str(out.finish_reason or "")])]))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self):
        self.llm.shutdown()
