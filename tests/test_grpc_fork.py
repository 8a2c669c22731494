"""Children forked while gRPC channels are busy exec instead of dying (runtime.threads.no_grpc_fork_handlers).

Before: with grpcio's fork handlers on, the supervisor's probe or export child (started with a preexec_fn
while the gateway's channels were busy) could abort before its exec ("Epoll1Poller encountered epoll_wait
error: Bad file descriptor"); a failed probe left a refusing server serving. 51 of 300 such children died
in the same script without the setting.
"""

from __future__ import annotations

import subprocess
import sys

from runtime.local import ROOT
from runtime.threads import NO_GRPC_FORK_HANDLERS

SPAWNS = 200
BUSY_CHANNEL_AND_FORKS = f"""
import asyncio
from concurrent import futures

import grpc

server = grpc.server(futures.ThreadPoolExecutor(4))
port = server.add_insecure_port("127.0.0.1:0")
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
    "t.T", {{"E": grpc.unary_unary_rpc_method_handler(lambda request, context: request)}}),))
server.start()


async def main() -> None:
    call = grpc.aio.insecure_channel(f"127.0.0.1:{{port}}").unary_unary("/t.T/E")

    async def busy() -> None:
        while True:
            await call(b"x")

    load = asyncio.create_task(busy())
    await asyncio.sleep(0.3)
    died = 0
    for _ in range({SPAWNS}):
        child = await asyncio.create_subprocess_exec("true", preexec_fn=lambda: None,
                                                     stderr=asyncio.subprocess.DEVNULL)
        died += await child.wait() != 0
    load.cancel()
    print(died)


asyncio.run(main())
"""


def test_children_forked_beside_busy_grpc_channels_all_exec():
    environment = {"PATH": "/usr/bin:/bin", **NO_GRPC_FORK_HANDLERS}
    run = subprocess.run([sys.executable, "-c", BUSY_CHANNEL_AND_FORKS], cwd=ROOT, env=environment,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert int(run.stdout.strip()) == 0, f"children died before their exec: {run.stdout} of {SPAWNS}"
