"""Triton Python model ``postprocessing``: token ids from ``tensorrt_llm`` -> text.

Batched inputs: ``TOKENS_BATCH`` [-1, -1] int32 (beams x tokens) and
``SEQUENCE_LENGTH`` [-1] int32 (per beam). Output: ``OUTPUT`` [-1] string, one text
per beam. Parameters: ``tokenizer_dir``, ``skip_special_tokens``.
"""

import numpy as np
import triton_python_backend_utils as pb_utils
from sqdeploy_triton import flag, load_tokenizer, parameters


class TritonPythonModel:
    def initialize(self, args):
        params = parameters(args)
        self.tokenizer = load_tokenizer(args, params)
        self.skip_special_tokens = flag(params, "skip_special_tokens", True)

    def execute(self, requests):
        return [self._decode(request) for request in requests]

    def _decode(self, request):
        tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy()  # [batch, beams, len]
        lengths = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH").as_numpy()  # [batch, beams]
        texts = [[self.tokenizer.decode(beam[: int(n)], skip_special_tokens=self.skip_special_tokens)
                  for beam, n in zip(seq, seq_lengths)] for seq, seq_lengths in zip(tokens, lengths)]
        out = np.array([[t.encode("utf-8") for t in row] for row in texts], dtype=np.object_)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT", out)])
