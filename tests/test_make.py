"""The Makefile's own interface: `make help` shows real values, the per-instance defaults reach server.py."""

from __future__ import annotations

import os
import subprocess

from conftest import ROOT


def make(*args: str) -> str:
    run = subprocess.run(["make", "-s", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_help_shows_the_values_not_the_variable_names():
    text = make("help")
    assert "$(" not in text, text
    assert "serve models/default on port 8000, Triton gRPC on PORT+1, repository build/model_repository-8000" in text
    assert "on port 8010, Triton gRPC on 9001, repository build/model_repository-8010" in make(
        "help", "PORT=8010", "GRPC_PORT=9001")


def test_serve_passes_grpc_port_and_repository_per_instance():
    default = make("-n", "serve")
    assert "--port 8000" in default and "--model-repository build/model_repository-8000" in default
    assert "--grpc-port" not in default  # server.py's own default: --port + 1
    other = make("-n", "serve", "PORT=8010", "GRPC_PORT=9001", "REPOSITORY=/tmp/mine")
    assert "--port 8010" in other and "--grpc-port 9001" in other and "--model-repository /tmp/mine" in other


def test_the_makefile_and_the_code_name_one_cache_folder():
    """make and a direct run (python -m evaluate, the MPNet judge, the decoders) use the same .cache."""
    from embcap.decoder_source import DEFAULT_CACHE_DIR

    environment = {k: v for k, v in os.environ.items() if k != "EMBCAP_CACHE_DIR"}
    run = subprocess.run(["make", "-s", "-C", str(ROOT), "--eval", "cache-dir: ; @echo $(EMBCAP_CACHE_DIR)",
                          "cache-dir"], capture_output=True, text=True, timeout=60, env=environment)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(DEFAULT_CACHE_DIR)
