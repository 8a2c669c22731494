"""Triton Python-backend model: prefix vectors -> captions, through a decoding engine.

`execute()` turns each request into an engine job answered through the request's
response sender, hands the jobs to the engine and returns (one final response per
request: the model is not decoupled, so the ensemble in front of it is unchanged).
The `continuous` engine answers from its own loop thread as each request's rows
finish; the `hf` engine answers before `submit()` returns. The engine is chosen at
export time (`--engine`, the `engine` parameter below); every setting is read once,
from this model's config parameters (keys: embcap.contract.Param).
With N > 1 candidates per row (the `candidates` parameter) it answers N captions per row
(`CANDIDATES`) for the reranker step; with one, the caption itself (`CAPTION`). With `fp8`
static or dynamic the continuous engine's projections are put in FP8 after loading (static: the
export's calibrated `fp8_input_scales`); a device that cannot run them fails the load, naming why.
The continuous engine's load profile (what answering rows costs at each batch fill, embcap.load_profile)
is published every second where server.py's gateway reads it (embcap.contract.engine_profile_file).

When the engine fails for good (its loop died, or its steps keep failing as after a
sticky CUDA error), every waiting request is answered with the error, the reason is
written where server.py's supervisor reads it (embcap.contract.engine_failure_file), and
this stub exits: the supervisor then restarts Triton, with health 503 and the reason
meanwhile, instead of a model that looks ready and never answers.
"""

import json
import os
import threading
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from embcap.contract import CANDIDATES, CAPTION, PREFIX, Param, engine_failure_file, engine_profile_file

# Rows answered, per model instance: how Triton spreads the work over instances and GPUs (export --gpus).
ROWS_COUNTER = ("embcap_decoded_rows_total", "Caption rows answered, by model instance and device")
EXIT_GRACE_S = 1.0  # time for the last error responses to leave before the stub exits
# A seam for the restart test (tests/test_engine_restart.py): after this many decode steps every step raises,
# as every step does after a sticky CUDA error, which cannot be caused on a CPU. Unset in production.
FAULT_AFTER_STEPS_ENV = "EMBCAP_FAULT_AFTER_STEPS"


class _Metrics:
    """embcap.engines.metrics' factory over Triton custom metrics (families kept as long as their metrics)."""

    def __init__(self):
        self.families = {}

    def _metric(self, name, description, kind, labels, **extra):
        if name not in self.families:
            self.families[name] = pb_utils.MetricFamily(name=name, description=description, kind=kind)
        return self.families[name].Metric(labels=labels, **extra)

    def counter(self, name, description, labels):
        return self._metric(name, description, pb_utils.MetricFamily.COUNTER, labels)

    def gauge(self, name, description, labels):
        return self._metric(name, description, pb_utils.MetricFamily.GAUGE, labels)

    def histogram(self, name, description, labels, buckets):
        return self._metric(name, description, pb_utils.MetricFamily.HISTOGRAM, labels, buckets=list(buckets))


class TritonPythonModel:
    def initialize(self, args):
        import torch

        from embcap.checkpoint import load_checkpoint
        from embcap.engines import Cancelled, EngineFailed, Job, Overloaded, create_engine
        from embcap.engines.metrics import EngineMetrics
        from embcap.device import resolve_decoder_device
        from embcap.loading import ResolvedCheckpoint

        self.job, self.cancelled_error = Job, Cancelled
        self.unavailable_errors = (EngineFailed, Overloaded)
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config["parameters"].items()}
        self.model_name = args.get("model_name", "decoder")
        self.instance_name = args.get("model_instance_name", self.model_name)
        torch.set_num_threads(int(params[Param.THREADS]))
        torch.set_num_interop_threads(1)  # threads count against the evaluator's pids limit
        checkpoint = load_checkpoint(params[Param.CHECKPOINT_DIR])
        torch.manual_seed(checkpoint.spec.generation.seed)  # the hf engine's sampling with one candidate
        choice = resolve_decoder_device(params[Param.DEVICE], checkpoint.spec.on_unusable_gpu,
                                        decoder_dir=params[Param.DECODER_DIR],
                                        max_new_tokens=checkpoint.spec.generation.max_new_tokens)
        if choice.line:
            pb_utils.Logger.log_error(f"decoder: {choice.line}")
        if not choice.serve:
            raise RuntimeError(choice.line)  # the model fails to load, with the reason
        device = choice.device
        dtype = getattr(torch, params[Param.DTYPE]) if device == "cuda" else torch.float32
        if device == "cuda" and args.get("model_instance_kind") == "GPU":
            # Triton places each instance on one GPU of the instance_group (export --gpus); the
            # stub is a process of its own, so making that GPU current affects this instance only.
            device = f"cuda:{int(args['model_instance_device_id'])}"
            torch.cuda.set_device(device)
        engine = params[Param.ENGINE]
        fp8, fp8_scales = params[Param.FP8], None
        if fp8 != "off":  # the export checked all this; a config edited since, or another GPU, fails loading here
            from embcap.fp8 import serving_problem
            from embcap.fp8_calibration import parse_scales

            problem = serving_problem(device) if engine == "continuous" else "it is the continuous engine's"
            if problem:
                raise RuntimeError(f"decoder: FP8 weights ({fp8}) cannot be served: {problem}")
            fp8_scales = parse_scales(params[Param.FP8_INPUT_SCALES]) if fp8 == "static" else None
        # The decoder folder the export resolved (a de-quantised GGUF is not resolved again here). The
        # continuous engine reads only its own layout of the weights, straight onto the device.
        generator = ResolvedCheckpoint(checkpoint, Path(params[Param.DECODER_DIR])).load_generator(
            device, dtype, lean=engine == "continuous", log=pb_utils.Logger.log_info)
        if fp8 != "off":
            generator.lean.quantise_fp8(fp8_scales, log=pb_utils.Logger.log_info)
        self.candidates = int(params[Param.CANDIDATES])
        self.output = CANDIDATES if self.candidates > 1 else CAPTION
        settings = {"timeout_s": float(params[Param.REQUEST_TIMEOUT_S]),
                    "max_queued_rows": int(params[Param.MAX_QUEUED_ROWS]),
                    "attention_backend": params[Param.ATTENTION_BACKEND],
                    "on_failure": self._engine_failed,
                    "on_profile": self._publish_profile} if engine == "continuous" else {}
        self.engine = create_engine(engine, generator, slots=int(config["max_batch_size"]),
                                    candidates=self.candidates, **settings)
        if os.environ.get(FAULT_AFTER_STEPS_ENV) and engine == "continuous":
            self._inject_sticky_fault(int(os.environ[FAULT_AFTER_STEPS_ENV]))
        instance = {"engine": self.engine.name, "instance": self.instance_name,
                    "device": device}
        self.factory = _Metrics()
        try:
            self.rows_metric = self.factory.counter(*ROWS_COUNTER, instance)
            self.metrics = EngineMetrics(self.engine, self.factory, instance,
                                         warn=pb_utils.Logger.log_warn).start()
        except Exception as exc:  # metrics are a convenience, never a reason to fail loading
            pb_utils.Logger.log_warn(f"decoder: metrics unavailable: {exc}")
            self.rows_metric = self.metrics = None
        capture = getattr(self.engine, "capture_seconds", 0.0)
        pb_utils.Logger.log_info(
            f"decoder: {checkpoint.spec.name} on {device}/{dtype}, engine {self.engine.name}, FP8 {fp8}, "
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
        self.engine.submit(jobs)  # a failed engine answers each job at once, with its reason
        return None

    def _answer(self, sender):
        def finish(texts, error):
            if error is not None:
                code = None
                if isinstance(error, self.cancelled_error):
                    code = pb_utils.TritonError.CANCELLED
                elif isinstance(error, self.unavailable_errors):
                    code = pb_utils.TritonError.UNAVAILABLE
                message = f"decoder failed: {error}"
                error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
                response = pb_utils.InferenceResponse(error=error)
            else:
                out = np.array([text.encode("utf-8") for text in texts], dtype=np.object_)
                response = pb_utils.InferenceResponse([pb_utils.Tensor(self.output,
                                                                       out.reshape(-1, self.candidates))])
            sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            if error is None and self.rows_metric is not None:  # bookkeeping after the answer is out
                try:
                    self.rows_metric.increment(len(texts) // self.candidates)
                except Exception as exc:
                    pb_utils.Logger.log_warn(f"decoder: counting rows failed: {exc}")

        return finish

    def _inject_sticky_fault(self, healthy_steps):
        step, done = self.engine.batch.step, [0]

        def failing_step():
            done[0] += 1
            if done[0] > healthy_steps:
                raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
            step()

        self.engine.batch.step = failing_step
        pb_utils.Logger.log_warn(f"decoder: {FAULT_AFTER_STEPS_ENV}={healthy_steps}: every step after that fails")

    def _publish_profile(self, profile):
        """The engine's load profile, where server.py's gateway reads it (replaced whole: never half-written)."""
        path = engine_profile_file(self.model_name, self.instance_name)
        staged = path.with_name(path.name + ".new")
        staged.write_text(profile.to_json())
        os.replace(staged, path)

    def _engine_failed(self, reason):
        """The engine cannot decode any more: leave the reason for the supervisor, then end this stub."""
        pb_utils.Logger.log_error(f"decoder: engine failed, exiting so that Triton is restarted: {reason}")
        try:
            path = engine_failure_file(self.model_name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(reason[:2000])
        except OSError as exc:
            pb_utils.Logger.log_error(f"decoder: cannot record the failure: {exc}")
        threading.Timer(EXIT_GRACE_S, os._exit, args=(70,)).start()

    def finalize(self):
        self.engine.close()
        if self.metrics is not None:
            self.metrics.stop()
        self.metrics = self.rows_metric = None  # the metrics go before their families
        self.factory.families.clear()
