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
import shutil
import sys
from pathlib import Path

import psutil

from embcap.checkpoint import SPEC_FILE
from embcap.contract import DECODER, ENSEMBLE, PROJECTOR
from embcap.gpu_probe import ProbeReport
from export.options import ExportOptions, to_argv
from export.templates import parse_model_config
from runtime.local import ROOT
from runtime.triton import TritonOptions, TritonProcess

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


class Supervisor:
    """Probes the GPU and exports the checkpoint, then keeps one tritonserver running and ready."""

    def __init__(self, args: argparse.Namespace, export_options: ExportOptions, on_ready,
                 on_devices=lambda devices: None) -> None:
        self.args = args
        self.export_options = export_options
        self.on_ready = on_ready
        self.on_devices = on_devices
        self.problem: str | None = "starting: exporting the model repository"
        self.notice: str | None = None  # reported in health while serving (a GPU that cannot be used)
        self.triton: TritonProcess | None = None
        self.export_process: asyncio.subprocess.Process | None = None
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
                                                       stderr=asyncio.subprocess.PIPE)
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
        self.export_process = await asyncio.create_subprocess_exec(*command, cwd=ROOT, stderr=asyncio.subprocess.PIPE)
        _, stderr = await self.export_process.communicate()
        if self.export_process.returncode != 0:
            message = stderr.decode(errors="replace").strip().splitlines()[-5:]
            self.problem = "export failed: " + " | ".join(message)
            log.error(self.problem)
            return False
        return True

    async def run(self) -> None:
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
        )
        while True:
            self.triton = TritonProcess(options)
            self.problem = "starting: loading models in tritonserver"
            self.triton.start()
            try:
                await asyncio.to_thread(self.triton.wait_ready, ENSEMBLE, self.args.ready_timeout)
            except (RuntimeError, TimeoutError) as exc:
                self.problem = f"tritonserver failed to start: {exc}"
                log.error(self.problem)
            else:
                stubs = python_stubs(self.triton.process.pid)
                self.problem = None
                log.info("tritonserver ready (restarts so far: %d)", self.restarts,
                         extra={"stubs": sorted(stubs.values())})
                self.on_ready()
                self.problem = await self._watch(stubs)
                log.error(self.problem)
            await asyncio.to_thread(self.triton.stop, 5)
            self.restarts += 1
            await asyncio.sleep(min(5.0, 0.5 * self.restarts))

    async def _watch(self, stubs: dict[int, str]) -> str:
        """Return once tritonserver or one of its Python-backend stubs has died.

        Triton keeps reporting a model ready after its stub died, while every request
        to it fails, so the stubs are watched here as processes."""
        while True:
            await asyncio.sleep(0.2)
            if not self.triton.alive():
                return f"tritonserver exited with code {self.triton.process.returncode}; restarting"
            for pid, model in stubs.items():
                if not _running(pid):
                    return f"the Python-backend stub of model '{model}' died; restarting tritonserver"

    async def stop(self) -> None:
        if self.export_process is not None and self.export_process.returncode is None:
            self.export_process.kill()
        if self.triton is not None:
            await asyncio.to_thread(self.triton.stop)
        if not self.args.skip_export and not self.args.keep_repository:
            shutil.rmtree(self.args.model_repository, ignore_errors=True)
