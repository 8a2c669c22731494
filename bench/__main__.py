"""`python -m bench`: run the benchmark, fetch perf_analyzer, re-render a report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.common import ROOT


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _ports(text: str) -> range:
    from runtime.local import parse_port_range

    try:
        return parse_port_range(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", allow_abbrev=False, help="one benchmark run (see bench/run.py)")
    run.add_argument("--mode", choices=("quick", "full"), default="quick")
    run.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "default")
    run.add_argument("--levels", type=_ints, help="concurrency levels, e.g. 1,4,8,16,32")
    run.add_argument("--rows-per-request", type=int, help="embeddings per request (evaluator: 4)")
    run.add_argument("--waves", type=int, help="requests per level = waves x concurrency (ours)")
    run.add_argument("--min-requests", type=int)
    run.add_argument("--baseline-waves", type=int)
    run.add_argument("--baseline-min-requests", type=int)
    run.add_argument("--level-duration-s", type=float, help="stop issuing requests after this long per level")
    run.add_argument("--timeout-s", type=float, help="per-request timeout (evaluator: 60)")
    run.add_argument("--offline-batches", type=_ints)
    run.add_argument("--offline-repeats", type=int, help="timed decodes per offline batch size (the best counts)")
    run.add_argument("--pa-levels", type=_ints, help="perf_analyzer concurrency levels")
    run.add_argument("--pa-requests-per-level", type=int)
    run.add_argument("--pool-requests", type=int, help="distinct request bodies")
    run.add_argument("--decoder-threads", type=int)
    run.add_argument("--export-arg", dest="export_args", action="append",
                     help="an export option for server.py (repeatable), e.g. --export-arg=--max-batch-size=32")
    run.add_argument("--skip", action="append", default=[], help="a phase to leave out (repeatable): "
                     "perf_analyzer, gateway, overhead, baseline, offline, engines or candidates")
    run.add_argument("--engines", type=lambda text: [e for e in text.split(",") if e],
                     help="engines to compare side by side (default hf,continuous)")
    run.add_argument("--engine-levels", type=_ints, help="concurrency levels of the engines phase")
    run.add_argument("--open-loop-requests", type=int)
    run.add_argument("--open-loop-load", type=float, help="open-loop arrival rate as a share of hf's capacity")
    run.add_argument("--overhead-requests", type=int, help="paired gateway-overhead samples per path (0 skips)")
    run.add_argument("--candidates", type=int, help="candidates per row our stack serves in the perf_analyzer, "
                                                    "gateway and overhead phases (default: the checkpoint's own)")
    run.add_argument("--candidate-counts", type=_ints, help="candidates per row of the candidates phase "
                                                            "(N=1 and the checkpoint's own are always added)")
    run.add_argument("--candidate-requests", type=int, help="sequential 4-row requests per N (the evaluator sends 16)")
    run.add_argument("--gateway-url", help="benchmark an already running gateway instead of starting server.py")
    run.add_argument("--grpc-url", help="its Triton gRPC address (for perf_analyzer and statistics)")
    run.add_argument("--ready-timeout-s", type=float, help="seconds each server the run starts has to become "
                                                           "healthy (default 300)")
    run.add_argument("--out", type=Path, help="results folder (default bench/results/<utc time>-<mode>)")
    run.add_argument("--ports", type=_ports, help="port range for the servers the run starts, e.g. 20000-20099 "
                                                  "(default: any free port)")
    commands.add_parser("fetch-perf-analyzer", allow_abbrev=False,
                        help="download and unpack the perf_analyzer binary once")
    render = commands.add_parser("report", allow_abbrev=False,
                                 help="re-render report.md and plot.png from a run's results.json")
    render.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)

    if args.command == "fetch-perf-analyzer":
        from bench.perf_analyzer import ensure_binary

        binary, _ = ensure_binary()
        print(binary)
        return 0
    if args.command == "report":
        import json

        from bench.report import write

        print(write(json.loads((args.run_dir / "results.json").read_text()), args.run_dir))
        return 0
    from bench.plan import Plan, PlanError
    from bench.run import run as run_bench

    options = {k: v for k, v in vars(args).items() if k not in ("command", "mode", "skip")}
    plan = Plan.preset(args.mode, skip=set(args.skip), **options)
    try:
        plan.validate()  # every name and range, before the first phase's minutes
    except PlanError as exc:
        parser.error(str(exc))
    results = run_bench(plan)
    empty = [f"{system} c={r['concurrency']}" for system in ("gateway", "baseline") for r in results[system]
             if r["ok"] == 0]
    if results["failed_phases"] or empty:
        print("bench run FAILED: " + "; ".join(
            [f"phase {name}: {failure['error']}" for name, failure in results["failed_phases"].items()]
            + [f"{level}: no request answered" for level in empty]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
