"""Triton Python-backend model: prefix vectors -> captions, through a decoding engine.

`execute()` turns each request into an engine job answered through the request's
response sender, hands the jobs to the engine and returns (one final response per
request: the model is not decoupled, so the ensemble in front of it is unchanged).
With N > 1 candidates per row (the `candidates` parameter) it answers N captions per row
(`CANDIDATES`) for the reranker step; with one, the caption itself (`CAPTION`).
The `continuous` engine answers from its own loop thread as each request's rows
finish; the `hf` engine answers before `submit()` returns. The engine is chosen at
export time (`--engine`, the `engine` parameter below).
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from embcap.contract import CANDIDATES, CAPTION, PREFIX

# EngineStats field -> (Triton custom metric, its help text)
COUNTERS = {
    "blank_fallbacks": ("embcap_blank_caption_fallbacks_total",
                        "Caption rows (candidates, with best-of-N) that stayed blank up to max_new_tokens and "
                        "were answered with the fallback text"),
    "cancelled_rows": ("embcap_cancelled_rows_total",
                       "Caption rows (candidates, with best-of-N) dropped mid-decode because their request was "
                       "cancelled or timed out"),
}


# Rows answered, per model instance: how Triton spreads the work over instances and GPUs (export --gpus).
ROWS_COUNTER = ("embcap_decoded_rows_total", "Caption rows answered, by model instance and device")


def _counter(name, description):
    """A Triton custom metric (shown on Triton's /metrics), or None where the stub lacks the API."""
    try:
        return pb_utils.MetricFamily(name=name, description=description, kind=pb_utils.MetricFamily.COUNTER)
    except Exception as exc:  # older stubs: metrics are a convenience, not a reason to fail loading
        pb_utils.Logger.log_warn(f"decoder: metric {name} unavailable: {exc}")
        return None


class TritonPythonModel:
    def initialize(self, args):
        import torch

        from embcap.checkpoint import load_checkpoint
        from embcap.engines import Cancelled, Job, create_engine
        from embcap.gpu_probe import resolve_decoder_device
        from embcap.loading import ResolvedCheckpoint

        self.job, self.cancelled_error = Job, Cancelled
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config["parameters"].items()}
        torch.set_num_threads(int(params["threads"]))
        checkpoint = load_checkpoint(params["checkpoint_dir"])
        torch.manual_seed(checkpoint.spec.generation.seed)
        choice = resolve_decoder_device(params["device"], checkpoint.spec.on_unusable_gpu,
                                        decoder_dir=params["decoder_dir"],
                                        max_new_tokens=checkpoint.spec.generation.max_new_tokens)
        if choice.line:
            pb_utils.Logger.log_error(f"decoder: {choice.line}")
        if not choice.serve:
            raise RuntimeError(choice.line)  # the model fails to load, with the reason
        device = choice.device
        dtype = getattr(torch, params["dtype"]) if device == "cuda" else torch.float32
        if device == "cuda" and args.get("model_instance_kind") == "GPU":
            # Triton places each instance on one GPU of the instance_group (export --gpus); the
            # stub is a process of its own, so making that GPU current affects this instance only.
            device = f"cuda:{int(args['model_instance_device_id'])}"
            torch.cuda.set_device(device)
        # The decoder folder the export resolved (a de-quantised GGUF is not resolved again here).
        generator = ResolvedCheckpoint(checkpoint, Path(params["decoder_dir"])).load_generator(device, dtype)
        self.candidates = int(params["candidates"])
        self.output = CANDIDATES if self.candidates > 1 else CAPTION
        self.engine = create_engine(params["engine"], generator, slots=int(config["max_batch_size"]),
                                    candidates=self.candidates)
        # A Metric must not outlive its MetricFamily: both are kept for the model's lifetime.
        self.families = {stat: _counter(name, text) for stat, (name, text) in COUNTERS.items()}
        self.counters = {stat: (family.Metric(labels={"engine": self.engine.name}) if family else None, 0)
                         for stat, family in self.families.items()}
        self.rows_family = _counter(*ROWS_COUNTER)
        instance = {"engine": self.engine.name, "instance": args.get("model_instance_name", "decoder"),
                    "device": device}
        self.rows_metric = self.rows_family.Metric(labels=instance) if self.rows_family else None
        capture = getattr(self.engine, "capture_seconds", 0.0)
        pb_utils.Logger.log_info(
            f"decoder: {checkpoint.spec.name} on {device}/{dtype}, engine {self.engine.name}, "
            f"{self.candidates} candidate(s) per row, prompt length {generator.prompt_length}, "
            f"CUDA graphs captured in {capture:.2f} s"
        )

    def execute(self, requests):
        jobs = []
        for request in requests:
            prefix = pb_utils.get_input_tensor_by_name(request, PREFIX).as_numpy()
            sender = request.get_response_sender()
            jobs.append(self.job(np.array(prefix, copy=True), self._answer(sender), sender.is_cancelled))
        pb_utils.Logger.log_verbose(f"decoder: {[r.request_id() for r in requests]}, "
                                    f"{sum(job.rows for job in jobs)} rows")
        self.engine.submit(jobs)
        return None

    def _answer(self, sender):
        def finish(texts, error):
            self._report_stats()
            if error is not None:
                code = pb_utils.TritonError.CANCELLED if isinstance(error, self.cancelled_error) else None
                message = f"decoder failed: {error}"
                error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
                response = pb_utils.InferenceResponse(error=error)
            else:
                if self.rows_metric is not None:
                    self.rows_metric.increment(len(texts) // self.candidates)
                out = np.array([text.encode("utf-8") for text in texts], dtype=np.object_)
                response = pb_utils.InferenceResponse([pb_utils.Tensor(self.output,
                                                                       out.reshape(-1, self.candidates))])
            sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

        return finish

    def _report_stats(self):
        """Add what the engine counted since the last report to the Triton metrics (and log fallbacks)."""
        for stat, (metric, reported) in list(self.counters.items()):
            count = getattr(self.engine.stats, stat)
            if count > reported:
                if metric is not None:
                    metric.increment(count - reported)
                if stat == "blank_fallbacks":
                    pb_utils.Logger.log_warn(f"decoder: {count - reported} blank row(s) answered with the fallback "
                                             f"caption ({count} in all)")
                self.counters[stat] = (metric, count)

    def finalize(self):
        self.engine.close()
        self.counters.clear()  # the metrics go before their families
        self.families.clear()
        self.rows_metric = self.rows_family = None
