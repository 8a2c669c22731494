"""Triton Python-backend model: embeddings -> prefix vectors with ONNX Runtime.

On a GPU with ONNX Runtime's TensorRT provider, a TensorRT engine is built from the
ONNX file at start-up into the engine cache folder (engines are GPU-specific); if
that fails it falls back to CUDA, then to the CPU.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from embcap.contract import EMBEDDING, PREFIX, Param


def _providers(accelerator: str, cache_dir: str, gpu: int) -> list:
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    trt = ("TensorrtExecutionProvider", {
        "device_id": gpu,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": cache_dir,
        "trt_fp16_enable": False,
    })
    cuda = ("CUDAExecutionProvider", {"device_id": gpu})
    chains = {
        "cpu": ["CPUExecutionProvider"],
        "cuda": [cuda, "CPUExecutionProvider"],
        "tensorrt": [trt, cuda, "CPUExecutionProvider"],
    }
    chains["auto"] = chains["tensorrt"]
    chain = chains[accelerator]
    return [p for p in chain if (p[0] if isinstance(p, tuple) else p) in available]


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        threads = int(params[Param.THREADS])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        cache_dir = params[Param.ENGINE_CACHE_DIR]
        if params[Param.ACCELERATOR] != "cpu" and hasattr(ort, "preload_dlls"):
            try:  # CUDA/cuDNN from the pip nvidia-* wheels are found only when preloaded
                ort.preload_dlls()
            except Exception as exc:
                pb_utils.Logger.log_warn(f"projector: preloading CUDA libraries failed ({exc})")
        # The GPU Triton placed this instance on (instance_group, export --gpus).
        gpu = int(args.get("model_instance_device_id", 0)) if args.get("model_instance_kind") == "GPU" else 0
        providers = _providers(params[Param.ACCELERATOR], cache_dir, gpu)
        onnx_path = os.path.join(args["model_repository"], params[Param.ONNX_PATH])  # relative to this model's folder
        if any(isinstance(p, tuple) for p in providers):
            os.makedirs(cache_dir, exist_ok=True)
        try:
            self.session = ort.InferenceSession(onnx_path, options, providers=providers)
        except Exception as exc:  # a TensorRT/CUDA start-up failure must not stop serving
            pb_utils.Logger.log_warn(f"projector: {providers} failed ({exc}); falling back to CPU")
            self.session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        pb_utils.Logger.log_info(f"projector: running on {self.session.get_providers()}")

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, EMBEDDING).as_numpy() for r in requests]
        try:
            prefix = self.session.run(None, {self.input_name: np.concatenate(arrays)})[0]
        except Exception as exc:
            error = pb_utils.TritonError(f"projector failed: {exc}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor(PREFIX, np.ascontiguousarray(rows))])
            for rows in np.split(prefix, np.cumsum([len(a) for a in arrays])[:-1])
        ]
