"""The candidates phase: latency and captions/s against N, the captions decoded (and reranked) per row.

For each N, server.py is started with `--candidates N` and measured on realistic inputs
(embcap.inputs: captions end at their own lengths): first the evaluator's way, one 4-row
request at a time, then a closed loop at `candidate_concurrency` for captions/s. The
verdict: the shipped N's (the checkpoint's `rerank.candidates`) 4-row p50 at most
`P50_TARGET_S`, printed beside N=1's. Triton's statistics over the sequential requests
give the reranker stage's cost: its time per request inside Triton against its own
compute (the rest is the ensemble step's queueing and transfer), which is also how long
reranking inside the decoder (BLS from its loop) would hold every decoding row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from bench import loadgen, triton_stats
from bench.common import embedding_pool, pyplot
from tooling.stats import VERDICT_WORDS, p50_ratio, p50_seconds, throughput_ratio, verdict

P50_TARGET_S = 8.0  # the shipped N's 4-row request p50 on the development CPU (2 cores)


def run_candidates(plan, out: Path, start_stack: Callable, warm: Callable, log: Callable[[str], None],
                   results: dict | None = None) -> dict:
    """Measure every N in `plan.candidate_counts`; `start_stack(plan, folder, export_args)` -> (child, grpc, cold s).
    Each N's entry is added to `results` (filled in place) as it is measured."""
    from embcap.checkpoint import load_checkpoint
    from embcap.contract import served_models

    shipped = load_checkpoint(plan.checkpoint).spec.rerank.candidates
    counts = sorted(set(plan.candidate_counts) | {1, shipped})
    bodies = loadgen.encode_bodies(embedding_pool(plan.pool_requests, plan.rows_per_request, plan.seed, "realistic"))
    results = {} if results is None else results
    results.update({"shipped": shipped, "counts": {}, "concurrency": plan.candidate_concurrency})
    for count in counts:
        folder = out / f"candidates-{count}"
        (folder / "logs").mkdir(parents=True, exist_ok=True)
        log(f"candidates {count}: starting server.py")
        stack, grpc_url, cold = start_stack(plan, folder, [f"--candidates={count}"])
        entry: dict = {"cold_start_s": cold}
        results["counts"][str(count)] = entry
        models = served_models(count)
        try:
            warm(stack.base_url, bodies, plan)
            log(f"candidates {count}: {plan.candidate_requests} sequential {plan.rows_per_request}-row requests, "
                f"then concurrency {plan.candidate_concurrency}")

            def before(concurrency):
                return triton_stats.snapshot(grpc_url, models)

            def after(concurrency, snap):
                return {"triton": triton_stats.delta(snap, triton_stats.snapshot(grpc_url, models))}

            sequential, loaded = loadgen.sweep(
                stack.base_url, bodies, plan.rows_per_request, [1, plan.candidate_concurrency],
                lambda c: plan.candidate_requests if c == 1 else plan.requests_for(c), plan.level_duration_s,
                plan.timeout_s, before, after)
            entry["sequential"], entry["loaded"] = sequential.to_dict(), loaded.to_dict()
        finally:
            entry["exit_code"] = stack.stop()
    return results


def write(phase: dict, out: Path) -> str:
    """candidates.md (table + verdict) and candidates.png; returns the markdown."""
    counts = sorted(int(count) for count in phase["counts"])
    base = phase["counts"]["1"]
    lines = ["## Candidates per row (best-of-N): latency and throughput", "",
             f"| N | 4-row p50 (s), one request at a time | vs N=1 | captions/s at c={phase['concurrency']} "
             "| vs N=1 | cold start (s) |", "|---:|---:|---:|---:|---:|---:|"]
    for count in counts:
        entry = phase["counts"][str(count)]
        seq, loaded = entry["sequential"], entry["loaded"]
        latency = p50_ratio(seq, base["sequential"])
        rate = throughput_ratio(loaded, base["loaded"])
        shipped = " (shipped)" if count == phase["shipped"] else ""
        lines.append(f"| {count}{shipped} | {p50_seconds(seq).text(2)} | {latency.text(2, 'x')} | "
                     f"{loaded['captions_per_s']:.2f} | {rate.text(2, 'x')} | {entry['cold_start_s']:.1f} |")
    shipped = phase["counts"][str(phase["shipped"])]["sequential"]
    estimate = p50_seconds(shipped)
    met = verdict(estimate, P50_TARGET_S, higher_is_better=False)
    summary = (f"shipped N={phase['shipped']}: 4-row p50 {estimate.text(2, ' s')} (target <= {P50_TARGET_S:g} s; "
               f"N=1: {p50_seconds(base['sequential']).text(2, ' s')}): {VERDICT_WORDS[met]}")
    lines += ["", summary, "", "Inside Triton, per sequential request (ms): the reranker stage's time against its own "
              "compute; the difference is the ensemble step's queueing and transfer.", "",
              "| N | decoder | reranker | reranker compute | ensemble step overhead |", "|---:|---:|---:|---:|---:|"]
    for count in counts:
        stats = phase["counts"][str(count)]["sequential"].get("extra", {}).get("triton", {})
        decoder, reranker = stats.get("decoder"), stats.get("reranker")
        if decoder is None:
            continue
        if reranker is None:
            lines.append(f"| {count} | {decoder['server_ms_per_request']:.1f} | - | - | - |")
        else:
            lines.append(f"| {count} | {decoder['server_ms_per_request']:.1f} | "
                         f"{reranker['server_ms_per_request']:.1f} | {reranker['compute_ms_per_request']:.1f} | "
                         f"{reranker['server_ms_per_request'] - reranker['compute_ms_per_request']:.1f} |")
    text = "\n".join(lines) + "\n"
    (out / "candidates.md").write_text(text)
    _plot(phase, counts, out / "candidates.png")
    return text


def _plot(phase: dict, counts: list[int], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    p50 = [phase["counts"][str(c)]["sequential"]["p50_ms"] / 1000 for c in counts]
    rate = [phase["counts"][str(c)]["loaded"]["captions_per_s"] for c in counts]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(counts, p50, marker="o")
    left.axhline(P50_TARGET_S, linestyle="--", color="grey", label=f"target {P50_TARGET_S:g} s (shipped N)")
    left.set_ylabel("4-row request p50 (s), one at a time")
    right.plot(counts, rate, marker="o", color="tab:orange")
    right.set_ylabel(f"captions/s at concurrency {phase['concurrency']}")
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(counts, [str(c) for c in counts])
        axis.set_xlabel("candidates per row")
        axis.grid(alpha=0.3)
    left.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
