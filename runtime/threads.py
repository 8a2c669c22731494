"""Thread and library settings of every serving process, written once.

Thread pools are sized from the CPU count by default, and threads count against the
evaluator's pids limit (100): OpenBLAS alone starts one thread per CPU in each Python
process (151 threads at start-up on a 64-CPU host). Spinning OpenMP workers also
collapse throughput when cores are shared (measured: 2 s instead of 0.1 s per decode
step on 2 busy cores), hence PASSIVE. The decoder raises torch's own count to its
configured threads (export --decoder-threads). The Dockerfile's ENV repeats
SINGLE_THREAD for the image (tests/test_threads.py checks that they agree).
"""

from __future__ import annotations

import os
from typing import Mapping, MutableMapping

# RAYON_NUM_THREADS: the tokenizers library's pool takes one thread per CPU in sched_getaffinity (64 on a
# 64-CPU host, in the export's encoder check alone) unless told otherwise.
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1"}
WORKER = {
    "OMP_WAIT_POLICY": "PASSIVE",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


# gRPC's fork handlers restart its poller in a forked child, and with a channel busy they abort the child
# before it execs (grpcio >= 1.80: grpc/grpc#43055; 51 of 300 children with a preexec_fn died here). Every
# child of ours execs at once, so the handlers have nothing to do: off, before grpc is imported.
NO_GRPC_FORK_HANDLERS = {"GRPC_ENABLE_FORK_SUPPORT": "false"}


def no_grpc_fork_handlers(environ: MutableMapping[str, str] = os.environ) -> None:
    """Turn gRPC's fork handlers off unless set otherwise; call before grpc is imported."""
    for name, value in NO_GRPC_FORK_HANDLERS.items():
        environ.setdefault(name, value)


def limit_threads(environ: MutableMapping[str, str] = os.environ) -> None:
    """One thread per library unless set otherwise; call before numpy is imported."""
    for name, value in SINGLE_THREAD.items():
        environ.setdefault(name, value)


def worker_environment(base: Mapping[str, str] | None = None, force: bool = False) -> dict[str, str]:
    """`base` (default: this process's environment) with the serving settings: kept where already set,
    unless `force` (benchmarks, so that every measured process runs under the same settings)."""
    env = dict(os.environ if base is None else base)
    for name, value in {**SINGLE_THREAD, **WORKER}.items():
        if force:
            env[name] = value
        else:
            env.setdefault(name, value)
    return env
