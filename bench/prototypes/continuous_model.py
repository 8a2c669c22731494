"""Prototype Triton decoder (replaces model_repository/decoder/1/model.py): iteration-level batching.

`execute()` only queues each request with its response sender and returns None
(the Python backend allows the response sender in the default, non-decoupled
mode: exactly one final response per request). A background thread runs
bench.prototypes.continuous.ContinuousDecoder: requests join the running batch at
the next decode step instead of waiting for the whole batch to finish, and each
request is answered as soon as its own rows are done.

`python -m bench run --decoder-model bench/prototypes/continuous_model.py` exports
the repository, puts this file in place of the decoder's model.py and measures it.
"""

import collections
import json
import queue
import sys
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, "__BENCH_ROOT__")  # the bench writes the repository root here


class TritonPythonModel:
    def initialize(self, args):
        import torch

        from bench.prototypes.continuous import ContinuousDecoder
        from embcap.checkpoint import load_checkpoint
        from embcap.generation import CaptionGenerator

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config["parameters"].items()}
        torch.set_num_threads(int(params["threads"]))
        checkpoint = load_checkpoint(params["checkpoint_dir"])
        torch.manual_seed(checkpoint.spec.generation.seed)
        self.generator = CaptionGenerator(checkpoint.spec, params["decoder_dir"], device="cpu", dtype=torch.float32)
        self.decoder = ContinuousDecoder(self.generator)
        self.max_rows = max(1, int(config.get("max_batch_size", 64)))
        self.inbox = queue.Queue()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="continuous-decoder", daemon=True)
        self.thread.start()
        pb_utils.Logger.log_info(f"decoder (continuous batching prototype): {checkpoint.spec.name}, "
                                 f"up to {self.max_rows} active rows")

    def execute(self, requests):
        for request in requests:
            prefix = pb_utils.get_input_tensor_by_name(request, "PREFIX").as_numpy().copy()
            self.inbox.put((prefix, request.get_response_sender()))
        return None

    def _run(self):
        backlog = collections.deque()
        pending = {}  # request number -> [sender, texts, rows left]
        number = 0
        while not self.stopping.is_set():
            try:
                if not self.decoder.active and not backlog:
                    backlog.append(self.inbox.get(timeout=0.1))
                while True:
                    backlog.append(self.inbox.get_nowait())
            except queue.Empty:
                pass
            try:
                prefixes, keys = [], []
                room = self.max_rows - self.decoder.active
                while backlog and (len(backlog[0][0]) <= room or (not self.decoder.active and not prefixes)):
                    prefix, sender = backlog.popleft()
                    room -= len(prefix)
                    pending[number] = [sender, [None] * len(prefix), len(prefix)]
                    keys += [(number, i) for i in range(len(prefix))]
                    prefixes.append(prefix)
                    number += 1
                if prefixes:
                    self.decoder.add(np.concatenate(prefixes), keys)
                for row in self.decoder.take_finished():
                    request, index = row.key
                    entry = pending[request]
                    entry[1][index] = self.decoder.text(row)
                    entry[2] -= 1
                    if entry[2] == 0:
                        del pending[request]
                        out = np.array([t.encode("utf-8") for t in entry[1]], dtype=np.object_).reshape(-1, 1)
                        entry[0].send(pb_utils.InferenceResponse([pb_utils.Tensor("CAPTION", out)]),
                                      flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                self.decoder.step()
            except Exception as exc:  # fail every waiting request, start clean
                error = pb_utils.TritonError(f"decoder failed: {exc}")
                for sender, _, _ in pending.values():
                    sender.send(pb_utils.InferenceResponse(error=error),
                                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                pending.clear()
                from bench.prototypes.continuous import ContinuousDecoder

                self.decoder = ContinuousDecoder(self.generator)

    def finalize(self):
        self.stopping.set()
        self.thread.join(timeout=10)
