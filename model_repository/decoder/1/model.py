"""Triton Python-backend model: prefix vectors -> captions.

Under dynamic batching `execute()` receives several requests: their rows are
stacked into one batch, decoded together (KV cache, each row stops at its own
stop token) and split back so each request gets its own rows in order.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from embcap.batching import split_rows


class TritonPythonModel:
    def initialize(self, args):
        import torch

        from embcap.checkpoint import load_checkpoint
        from embcap.generation import CaptionGenerator

        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        torch.set_num_threads(int(params["threads"]))
        checkpoint = load_checkpoint(params["checkpoint_dir"])
        torch.manual_seed(checkpoint.spec.generation.seed)
        device = params["device"]
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and not torch.cuda.is_available():
            pb_utils.Logger.log_warn("decoder: CUDA requested but not available; using the CPU")
            device = "cpu"
        dtype = getattr(torch, params["dtype"]) if device == "cuda" else torch.float32
        self.generator = CaptionGenerator(checkpoint.spec, params["decoder_dir"], device=device, dtype=dtype)
        pb_utils.Logger.log_info(
            f"decoder: {checkpoint.spec.name} on {device}/{dtype}, prompt length {self.generator.prompt_length}"
        )

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, "PREFIX").as_numpy() for r in requests]
        pb_utils.Logger.log_verbose(f"decoder batch: {[r.request_id() for r in requests]}, {sum(map(len, arrays))} rows")
        try:
            captions = self.generator.generate(np.concatenate(arrays))
        except Exception as exc:
            error = pb_utils.TritonError(f"decoder failed: {exc}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        responses = []
        for rows in split_rows(captions, [len(a) for a in arrays]):
            out = np.array([text.encode("utf-8") for text in rows], dtype=np.object_).reshape(-1, 1)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("CAPTION", out)]))
        return responses
