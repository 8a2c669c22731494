"""Supervision of the model server: probe the GPU, export the checkpoint, keep one tritonserver running.

The probe and the export (runtime.exporting; a cached one when it fits) run as child processes
(torch and CUDA stay out of the server's process). Triton is restarted when it or one of its
Python-backend stubs dies; `status()` says what keeps the model from serving, for the health answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from embcap.checkpoint import SPEC_FILE
from embcap.contract import ENSEMBLE, engine_failure_file
from embcap.device import ProbeReport
from export.cache import ExportCache, default_cache_root, export_key
from export.options import ExportOptions
from runtime import exporting
from runtime.instance import Record, RepositoryLock, new_instance_id, shm_prefix
from runtime.lifetime import dies_with_this_process
from runtime.local import ROOT
from runtime.models import model_devices, python_stubs, running
from runtime.triton import TritonOptions, TritonProcess
from runtime.triton_log import TritonLog, pump

log = logging.getLogger("embcap.server")

PUMP_DRAIN_S = 2.0  # after Triton exits, how long its last output lines may take to arrive
WATCH_INTERVAL_S = 0.2
WATCHDOG_STALE_S = 10.0  # the watch loop has not run for this long: liveness fails


class Supervisor:
    """Probes the GPU and exports the checkpoint, then keeps one tritonserver running and ready.

    `instance_id` is the server's identity (runtime.instance): its Triton is started with it and
    only a Triton that answers with it is taken for ready. `lock`, when given, is the claim on the
    model repository; its record says what this instance leaves on disk, for the next start's sweep."""

    def __init__(self, args: argparse.Namespace, export_options: ExportOptions, on_ready,
                 on_devices=lambda devices: None, instance_id: str | None = None,
                 lock: RepositoryLock | None = None) -> None:
        self.args = args
        self.export_options = export_options
        self.export_cache = ExportCache(default_cache_root())
        self.on_ready = on_ready
        self.on_devices = on_devices
        self.instance_id = instance_id or new_instance_id()
        self.lock = lock
        self.problem: str | None = "starting: exporting the model repository"
        self.notice: str | None = None  # reported in health while serving (a GPU that cannot be used)
        self.triton: TritonProcess | None = None
        self.triton_log = TritonLog()
        self.export_process: asyncio.subprocess.Process | None = None
        self.exported = False  # this instance wrote the repository (so stop() removes it)
        self.restarts = 0
        self.watching = False  # the watch loop runs (Triton is up): its beats must keep coming
        self.beat = time.monotonic()  # the watch loop's last round
        self.failure: str | None = None  # the supervisor itself stopped: why (the process exits non-zero)

    def status(self) -> str | None:  # what keeps the model from serving, for health
        return self.failure or self.problem

    def liveness(self) -> str | None:
        """Why this process should be restarted (the supervisor stopped, or its watch loop stalled), or None."""
        if self.failure:
            return self.failure
        stalled = time.monotonic() - self.beat
        if self.watching and stalled > WATCHDOG_STALE_S:
            return f"the Triton watchdog has not run for {stalled:.0f} s"
        return None

    def fail(self, reason: str) -> None:
        """The supervisor cannot go on: health and liveness say why from now on."""
        self.failure = reason
        log.error(reason)

    async def _probe(self) -> tuple[ProbeReport | None, dict | None]:
        """Run `python -m runtime.gpu_probe` (torch and CUDA stay out of this process): (report, decision)."""
        command = [sys.executable, "-m", "runtime.gpu_probe", "--json"]
        if (Path(self.args.checkpoint) / SPEC_FILE).is_file():
            command += ["--checkpoint", str(self.args.checkpoint)]
        if self.args.on_unusable_gpu:
            command += ["--policy", self.args.on_unusable_gpu]
        process = await asyncio.create_subprocess_exec(*command, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.PIPE,
                                                       preexec_fn=dies_with_this_process())
        stdout, stderr = await process.communicate()
        try:
            answer = json.loads(stdout)
        except json.JSONDecodeError:
            message = (stderr or stdout).decode(errors="replace").strip().splitlines()[-1:]
            self.notice = f"GPU probe failed (exit {process.returncode}): {' '.join(message)}"
            log.error(self.notice)
            return None, None
        report, decision = ProbeReport.from_dict(answer["report"]), answer["decision"]
        if decision["line"]:
            (log.warning if decision["serve"] else log.error)(decision["line"])
        else:
            log.info("GPU probe: %s", answer["summary"])
        return report, decision

    async def _export(self, probe: asyncio.Task) -> bool:
        """Export the checkpoint into the model repository, or reuse the cached export of the same one."""
        if self.args.skip_export:
            return True
        key = await asyncio.to_thread(export_key, self.args.checkpoint, self.export_options.to_dict(), os.environ)
        repository = Path(self.args.model_repository)
        if not self.args.fresh_export and await exporting.reuse(self.export_cache, key, repository,
                                                                self.export_options.device, probe):
            self.exported = True
            return True
        self.export_process = await exporting.start(self.args.checkpoint, repository, self.export_options)
        failure = await exporting.problem(self.export_process)
        if failure:
            self.problem = failure
            return False
        self.exported = True
        await asyncio.to_thread(exporting.keep, self.export_cache, key, repository)
        return True

    def _record(self) -> None:
        """Write what this instance leaves on disk into the repository lock (for a successor's sweep)."""
        if self.lock is not None:
            self.lock.write(Record(pid=os.getpid(), instance_id=self.instance_id,
                                   shm_prefix=shm_prefix(self.instance_id), temp_root=tempfile.gettempdir(),
                                   exports=not self.args.skip_export))

    async def _start_triton(self, options: TritonOptions) -> asyncio.Task:
        """Start tritonserver with its output piped through us; returns the task copying it."""
        self.triton = TritonProcess(options, log_file=subprocess.PIPE)
        self.triton_log = TritonLog()
        await self.triton.start_in_loop()
        return asyncio.create_task(pump(self.triton.process.stdout, self.triton_log, sys.stdout.buffer))

    async def _why(self, copying: asyncio.Task, what: str) -> str:
        """`what`, with the Triton error line that explains it once the output has been read to its end."""
        if not self.triton.alive():
            await asyncio.wait([copying], timeout=PUMP_DRAIN_S)
        cause = self.triton_log.first_error()
        return f"{what}: {cause}" if cause else what

    async def run(self) -> None:
        """Export, then keep Triton running; never returns: a refusal or a failed export parks it (health
        says why), and only a bug ends it (serve() then exits non-zero)."""
        self._record()
        probe = asyncio.create_task(self._probe())  # alongside the export: both import torch
        exported = await self._export(probe)
        report, decision = await probe
        if decision is not None and not decision["serve"]:
            self.problem = decision["line"]
        elif exported:
            if decision is not None:
                self.notice = decision["line"]
            await self._keep_triton(report)
        await asyncio.Future()  # stay up and unhealthy: health answers 503 with the reason

    async def _keep_triton(self, report: ProbeReport | None) -> None:
        if report is not None:
            devices = model_devices(Path(self.args.model_repository), report)
            log.info("model devices: %s", ", ".join(f"{m} on {d}" for m, d in devices.items()))
            self.on_devices(devices)
        options = TritonOptions(
            model_repository=Path(self.args.model_repository).resolve(), grpc_port=self.args.grpc_port,
            metrics_port=self.args.metrics_port, gpu_metrics=report is not None and report.usable("torch"),
            instance_id=self.instance_id,
        )
        while True:
            try:
                await self._run_triton_once(options)
            except Exception as exc:  # anything else that breaks a round: said, survived, retried
                self.problem = f"supervising tritonserver failed: {exc!r}; restarting it"
                log.exception(self.problem)
            self.watching = False
            if self.triton is not None:
                await asyncio.to_thread(self.triton.stop, 5)
            self.restarts += 1
            await asyncio.sleep(min(5.0, 0.5 * self.restarts))

    async def _run_triton_once(self, options: TritonOptions) -> None:
        """Start tritonserver, wait until it is ready, watch it until it or a stub dies."""
        self.problem = "starting: loading models in tritonserver"
        copying = await self._start_triton(options)
        try:
            try:
                await asyncio.to_thread(self.triton.wait_ready, ENSEMBLE, self.args.ready_timeout)
            except (RuntimeError, TimeoutError) as exc:
                self.problem = await self._why(copying, f"tritonserver failed to start: {exc}")
                log.error(self.problem)
                return
            stubs = python_stubs(self.triton.process.pid)
            if self.lock is not None:
                self.lock.update(python_env_dirs=self.triton.python_env_dirs)
            self.problem = None
            log.info("tritonserver ready (restarts so far: %d)", self.restarts, extra={"stubs": sorted(stubs.values())})
            self.on_ready()
            self.triton_log.reset()  # from here on, errors say why the running server failed
            self.problem = await self._why(copying, await self._watch(stubs)) + "; restarting tritonserver"
            log.error(self.problem)
        finally:
            copying.cancel()

    async def _watch(self, stubs: dict[int, str]) -> str:
        """Return once tritonserver or one of its Python-backend stubs has died.

        Triton keeps reporting a model ready after its stub died, while every request to it fails,
        so the stubs are watched here as processes."""
        self.watching, self.beat = True, time.monotonic()
        try:
            while True:
                await asyncio.sleep(WATCH_INTERVAL_S)
                self.beat = time.monotonic()
                if not self.triton.alive():  # waitpid: needs no file descriptor
                    return f"tritonserver exited with code {self.triton.process.returncode}"
                try:
                    for pid, model in stubs.items():
                        if not running(pid):
                            return self._stub_death(model)
                except Exception as exc:  # e.g. OSError EMFILE: out of file descriptors; Triton itself is still seen
                    log.warning("watchdog: cannot check the Python-backend stubs (%s); checking again", exc)
        finally:
            self.watching = False

    def _stub_death(self, model: str) -> str:
        """Why a stub died: the reason its engine left before exiting (contract.engine_failure_file), or that it did."""
        try:
            reason = engine_failure_file(model, self.triton.temp_dir).read_text(errors="replace").strip()
        except OSError:
            reason = ""
        if reason:
            return f"the engine of model '{model}' failed ({reason[:300]}); its stub exited"
        return f"the Python-backend stub of model '{model}' died"

    async def stop(self) -> None:
        if self.export_process is not None and self.export_process.returncode is None:
            self.export_process.kill()
        if self.triton is not None:
            await asyncio.to_thread(self.triton.stop)
        if self.exported and not self.args.keep_repository:
            shutil.rmtree(self.args.model_repository, ignore_errors=True)
