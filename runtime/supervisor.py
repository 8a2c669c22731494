"""Supervision of the model server: probe the GPU, export the checkpoint, keep one tritonserver running.

The probe and the export run as child processes (torch and CUDA stay out of the
server's process). Triton is restarted when it or one of its Python-backend stubs
dies; `status()` says what keeps the model from serving, for the health answer.
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
from pathlib import Path

import psutil

from embcap.checkpoint import SPEC_FILE
from embcap.contract import DECODER, ENSEMBLE, PROJECTOR
from embcap.gpu_probe import ProbeReport
from export import EXPORT_FAILED
from export.options import ExportOptions, to_argv
from export.templates import parse_model_config
from runtime.instance import Record, RepositoryLock, new_instance_id, shm_prefix
from runtime.local import ROOT
from runtime.triton import TritonOptions, TritonProcess, die_with_parent
from runtime.triton_log import TritonLog, pump

log = logging.getLogger("embcap.server")
MODEL_RUNTIMES = {DECODER: "torch", PROJECTOR: "onnxruntime"}  # which runtime puts each model on a GPU


def python_stubs(triton_pid: int) -> dict[int, str]:
    """Python-backend stub processes of a tritonserver: pid -> model name."""
    stubs = {}
    for child in psutil.Process(triton_pid).children():
        try:
            if child.name() == "triton_python_backend_stub":
                stubs[child.pid] = Path(child.cmdline()[1]).parent.parent.name
        except (psutil.NoSuchProcess, IndexError):
            continue
    return stubs


def model_devices(repository: Path, report: ProbeReport) -> dict[str, str]:
    """Model -> "cuda" or "cpu": GPU instances whose runtime the probe found usable run on cuda."""
    devices = {}
    for path in sorted(repository.glob("*/config.pbtxt")):
        config = parse_model_config(path.read_text(), str(path))
        if not config.instance_group:
            continue  # an ensemble runs nowhere itself
        gpu = any(group.kind == group.KIND_GPU for group in config.instance_group)
        runtime = MODEL_RUNTIMES.get(config.name)
        devices[config.name] = "cuda" if gpu and (runtime is None or report.usable(runtime)) else "cpu"
    return devices


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


PUMP_DRAIN_S = 2.0  # after Triton exits, how long its last output lines may take to arrive


def export_problem(stderr: bytes) -> str:
    """Health's reason for a failed export: its last lines, prefixed once."""
    lines = [line.strip() for line in stderr.decode(errors="replace").strip().splitlines() if line.strip()][-5:]
    return EXPORT_FAILED + " | ".join(line.removeprefix(EXPORT_FAILED) for line in lines)


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

    def status(self) -> str | None:
        return self.problem

    def notice_text(self) -> str | None:
        return self.notice

    async def _probe(self) -> tuple[ProbeReport | None, dict | None]:
        """Run `python -m embcap.gpu_probe` (torch and CUDA stay out of this process): (report, decision)."""
        command = [sys.executable, "-m", "embcap.gpu_probe", "--json"]
        if (Path(self.args.checkpoint) / SPEC_FILE).is_file():
            command += ["--checkpoint", str(self.args.checkpoint)]
        if self.args.on_unusable_gpu:
            command += ["--policy", self.args.on_unusable_gpu]
        process = await asyncio.create_subprocess_exec(*command, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.PIPE, preexec_fn=die_with_parent)
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

    async def _export(self) -> bool:
        if self.args.skip_export:
            return True
        command = [sys.executable, "-m", "export", str(self.args.checkpoint), "--out", str(self.args.model_repository),
                   *to_argv(self.export_options)]
        log.info("exporting: %s", " ".join(command))
        self.export_process = await asyncio.create_subprocess_exec(*command, cwd=ROOT, stderr=asyncio.subprocess.PIPE,
                                                                   preexec_fn=die_with_parent)
        _, stderr = await self.export_process.communicate()
        if self.export_process.returncode != 0:
            self.problem = export_problem(stderr)
            log.error(self.problem)
            return False
        self.exported = True
        return True

    def _record(self) -> None:
        """Write what this instance leaves on disk into the repository lock (for a successor's sweep)."""
        if self.lock is not None:
            self.lock.write(Record(pid=os.getpid(), instance_id=self.instance_id, shm_prefix=shm_prefix(self.instance_id),
                                   temp_root=tempfile.gettempdir(), exports=not self.args.skip_export))

    async def _start_triton(self, options: TritonOptions) -> asyncio.Task:
        """Start tritonserver with its output piped through us; returns the task copying it."""
        self.triton = TritonProcess(options, log_file=subprocess.PIPE)
        self.triton_log = TritonLog()
        self.triton.start()
        return asyncio.create_task(pump(self.triton.process.stdout, self.triton_log, sys.stdout.buffer))

    async def _why(self, copying: asyncio.Task, what: str) -> str:
        """`what`, with the Triton error line that explains it once the output has been read to its end."""
        if not self.triton.alive():
            await asyncio.wait([copying], timeout=PUMP_DRAIN_S)
        cause = self.triton_log.first_error()
        return f"{what}: {cause}" if cause else what

    async def run(self) -> None:
        self._record()
        probe = asyncio.create_task(self._probe())  # alongside the export: both import torch
        exported = await self._export()
        report, decision = await probe
        if decision is not None and not decision["serve"]:
            self.problem = decision["line"]
            return  # stay up and unhealthy: health answers 503 with the reason
        if decision is not None:
            self.notice = decision["line"]
        if not exported:
            return
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
            self.problem = "starting: loading models in tritonserver"
            copying = await self._start_triton(options)
            try:
                await asyncio.to_thread(self.triton.wait_ready, ENSEMBLE, self.args.ready_timeout)
            except (RuntimeError, TimeoutError) as exc:
                self.problem = await self._why(copying, f"tritonserver failed to start: {exc}")
                log.error(self.problem)
            else:
                stubs = python_stubs(self.triton.process.pid)
                if self.lock is not None:
                    self.lock.update(python_env_dirs=self.triton.python_env_dirs)
                self.problem = None
                log.info("tritonserver ready (restarts so far: %d)", self.restarts,
                         extra={"stubs": sorted(stubs.values())})
                self.on_ready()
                self.triton_log.reset()  # from here on, errors say why the running server failed
                self.problem = await self._why(copying, await self._watch(stubs)) + "; restarting tritonserver"
                log.error(self.problem)
            await asyncio.to_thread(self.triton.stop, 5)
            copying.cancel()
            self.restarts += 1
            await asyncio.sleep(min(5.0, 0.5 * self.restarts))

    async def _watch(self, stubs: dict[int, str]) -> str:
        """Return once tritonserver or one of its Python-backend stubs has died.

        Triton keeps reporting a model ready after its stub died, while every request
        to it fails, so the stubs are watched here as processes."""
        while True:
            await asyncio.sleep(0.2)
            if not self.triton.alive():
                return f"tritonserver exited with code {self.triton.process.returncode}"
            for pid, model in stubs.items():
                if not _running(pid):
                    return f"the Python-backend stub of model '{model}' died"

    async def stop(self) -> None:
        if self.export_process is not None and self.export_process.returncode is None:
            self.export_process.kill()
        if self.triton is not None:
            await asyncio.to_thread(self.triton.stop)
        if self.exported and not self.args.keep_repository:
            shutil.rmtree(self.args.model_repository, ignore_errors=True)
