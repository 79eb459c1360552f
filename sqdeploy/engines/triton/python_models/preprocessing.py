"""Triton Python model ``preprocessing``: prompts -> token ids for the ``tensorrt_llm`` model.

Batched inputs: ``QUERY`` [1] string, ``REQUEST_OUTPUT_LEN`` [1] int32, optional
``END_ID`` / ``PAD_ID`` [1] int32 (default: the tokenizer's EOS and pad ids).
Outputs: ``INPUT_ID`` [-1] int32 (right-padded), ``REQUEST_INPUT_LEN`` [1],
``REQUEST_OUTPUT_LEN`` [1], ``OUT_END_ID`` [1], ``OUT_PAD_ID`` [1], all int32.
Parameters: ``tokenizer_dir``, ``add_special_tokens``.
"""

import numpy as np
import triton_python_backend_utils as pb_utils
from sqdeploy_triton import as_text, flag, load_tokenizer, optional_input, parameters


class TritonPythonModel:
    def initialize(self, args):
        params = parameters(args)
        self.tokenizer = load_tokenizer(args, params)
        self.add_special_tokens = flag(params, "add_special_tokens", True)

    def execute(self, requests):
        return [self._encode(request) for request in requests]

    def _encode(self, request):
        queries = pb_utils.get_input_tensor_by_name(request, "QUERY").as_numpy().reshape(-1)
        out_len = pb_utils.get_input_tensor_by_name(request, "REQUEST_OUTPUT_LEN").as_numpy().reshape(-1, 1)
        n = len(queries)
        end_id = optional_input(pb_utils, request, "END_ID", np.full((n, 1), self.tokenizer.eos_token_id))
        pad_id = optional_input(pb_utils, request, "PAD_ID", np.full((n, 1), self.tokenizer.pad_token_id))
        ids = [self.tokenizer.encode(as_text(q), add_special_tokens=self.add_special_tokens) for q in queries]
        width = max(len(x) for x in ids)
        padded = np.stack([np.pad(np.array(x, np.int32), (0, width - len(x)), constant_values=int(pad_id.reshape(-1)[i]))
                           for i, x in enumerate(ids)])
        lengths = np.array([[len(x)] for x in ids], dtype=np.int32)
        outputs = [("INPUT_ID", padded), ("REQUEST_INPUT_LEN", lengths), ("REQUEST_OUTPUT_LEN", out_len),
                   ("OUT_END_ID", end_id.reshape(n, 1)), ("OUT_PAD_ID", pad_id.reshape(n, 1))]
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v.astype(np.int32)) for k, v in outputs])
