"""Triton Python-backend model: a row's N candidate captions + its embedding -> the best candidate.

The candidates of every request in the dynamic batch are embedded in one call of the
checkpoint's `rerank.encoder` (identical candidates once), then each row answers the
candidate closest to its input embedding (embcap.rerank). The ensemble runs this step
after the decoder, so the gateway still gets one caption per row.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from embcap.contract import CANDIDATES, CAPTION, EMBEDDING, Param


class TritonPythonModel:
    def initialize(self, args):
        import torch

        from embcap.candidate_encoders import load_text_encoder
        from embcap.checkpoint import load_checkpoint
        from embcap.rerank import Reranker

        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        threads = int(params[Param.THREADS])
        torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)  # threads count against the evaluator's pids limit
        checkpoint = load_checkpoint(params[Param.CHECKPOINT_DIR])
        device, providers = "cpu", None
        if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available():
            device = f"cuda:{int(args['model_instance_device_id'])}"
            providers = [("CUDAExecutionProvider", {"device_id": int(args["model_instance_device_id"])}),
                         "CPUExecutionProvider"]
        encoder = load_text_encoder(checkpoint, device=device, providers=providers, threads=threads)
        self.reranker = Reranker(encoder, checkpoint.spec.rerank.consensus_weight)
        pb_utils.Logger.log_info(f"reranker: {type(encoder).__name__} on {device}, "
                                 f"consensus weight {checkpoint.spec.rerank.consensus_weight}")

    def execute(self, requests):
        embeddings, candidates, sizes = [], [], []
        for request in requests:
            rows = pb_utils.get_input_tensor_by_name(request, EMBEDDING).as_numpy()
            texts = pb_utils.get_input_tensor_by_name(request, CANDIDATES).as_numpy()
            embeddings.append(rows)
            candidates += [[text.decode("utf-8", "replace") for text in row] for row in texts]
            sizes.append(len(rows))
        try:
            chosen = self.reranker.choose(np.concatenate(embeddings), candidates).texts
        except Exception as exc:
            error = pb_utils.TritonError(f"reranker failed: {exc}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        responses, start = [], 0
        for size in sizes:
            out = np.array([text.encode("utf-8") for text in chosen[start:start + size]], dtype=np.object_)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(CAPTION, out.reshape(-1, 1))]))
            start += size
        return responses
