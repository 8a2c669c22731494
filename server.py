"""What the container runs: export the checkpoint, supervise tritonserver, serve the gateway on :8000.

`python server.py --help` lists the options (the export's among them). The work is done
in runtime/ (runtime.serve: the process, runtime.supervisor: Triton); this file is the
entry point the evaluator's repository layout names.
"""

from __future__ import annotations

import sys

from runtime.threads import limit_threads, no_grpc_fork_handlers

limit_threads()  # before numpy loads anywhere in this process or its children
no_grpc_fork_handlers()  # before grpc loads: the supervisor forks children while the gateway's channels are busy

from runtime.serve import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
