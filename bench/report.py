"""results.json -> report.md (tables, targets, machine) and plot.png.

Every verdict comes from tooling.stats: met or missed only when the whole 95% interval is on one side.

Longer than 250 lines: the targets table alone holds every verdict the benchmark gives (throughput,
latency, overhead), each with its interval and the reason a figure is missing; the markdown and the plot
read the same results and stay beside it.
"""

from __future__ import annotations

from pathlib import Path

from bench.common import fmt, level, pyplot, save, table, verdict_lines
from bench.overhead import connection_text, median_text, new_connection_text
from tooling.stats import p50_ratio, ratio_estimate, throughput_ratio, throughput_rel_se, verdict, welch_difference

TARGETS = {
    "throughput_c16": "captions/s at concurrency 16 >= 4x the naive baseline",
    "latency_c1": "p50 latency at concurrency 1 <= 1.1x the baseline",
    "gateway_overhead": "gateway overhead at concurrency 1 (time outside Triton, gateway path - direct gRPC path, "
                        "paired per request) < 2 ms",
    "offline_c32": "captions/s at concurrency 32 >= 80% of offline throughput at the same batch size",
    "cold_start": "cold start (process start to healthy) < 30 s",
}


def _offline_at(offline: dict | None, batch: float, exact: bool = False) -> dict | None:
    """The offline result at `batch`, or (not `exact`) the nearest measured batch size."""
    found = sorted((offline or {}).get("results", []), key=lambda r: (abs(r["batch"] - batch), -r["batch"]))
    return next((r for r in found if not exact or r["batch"] == batch), None)


def served_text(results: dict) -> str:
    """Candidates per row our stack served, e.g. "best-of-16" or "greedy (one candidate per row)"."""
    served = results.get("served_candidates", 1)
    if served is None:
        return "as the external stack was started"
    return "greedy (one candidate per row)" if served == 1 else f"best-of-{served}"


def targets(results: dict) -> list[dict]:
    """Each target with its measured value, threshold and verdict (None: not measurable in this run)."""
    ours, base = results.get("gateway", []), results.get("baseline", [])
    served = results.get("served_candidates", 1)
    against = "" if served == 1 else f"; ours {served_text(results)}, the baseline greedy"
    out = []

    def add(key: str, value, threshold, met, detail: str) -> None:
        out.append({"key": key, "target": TARGETS[key], "value": value, "threshold": threshold, "met": met,
                    "detail": detail})

    o16, b16 = level(ours, 16), level(base, 16)
    ratio = throughput_ratio(o16, b16)
    if ratio:
        detail = f"{o16['captions_per_s']:.2f} vs {b16['captions_per_s']:.2f} captions/s = {ratio.text(unit='x')}"
        rows = results.get("plan", {}).get("rows_per_request", 4)
        small, large = (_offline_at(results.get("offline"), b, exact=True) for b in (rows, 16 * rows))
        if small and large:
            detail += (f" (ceiling from the offline loop: batch {16 * rows} / batch {rows} = "
                       f"{large['captions_per_s'] / small['captions_per_s']:.2f}x)")
        add("throughput_c16", ratio.value, 4.0, verdict(ratio, 4.0, True), detail + against)
    else:
        add("throughput_c16", None, 4.0, None, "concurrency 16 not run for both")

    o1, b1 = level(ours, 1), level(base, 1)
    ratio = p50_ratio(o1, b1)
    if ratio:
        add("latency_c1", ratio.value, 1.1, verdict(ratio, 1.1, False),
            f"{o1['p50_ms']:.1f} vs {b1['p50_ms']:.1f} ms = {ratio.text(3, 'x')}{against}")
    else:
        add("latency_c1", None, 1.1, None, "concurrency 1 not run for both")

    # The one overhead figure: per-request samples, each that request's time outside Triton (bench/overhead.py).
    samples = results.get("overhead_paired") or {}
    ours_ms, direct_ms = samples.get("gateway_outside_ms") or [], samples.get("direct_outside_ms") or []
    estimate = welch_difference(ours_ms, direct_ms)
    detail = (f"paired per request over {len(ours_ms)} + {len(direct_ms)} requests, {connection_text(samples)}: "
              f"{estimate.text(unit=' ms')}{new_connection_text(samples)}{median_text(samples)}" if estimate
              else "not measured (paired samples need --overhead-requests >= 2 and a gRPC address): n/a")
    add("gateway_overhead", estimate and estimate.value, 2.0, verdict(estimate, 2.0, False), detail)

    o32 = level(ours, 32)
    triton = (o32 or {}).get("extra", {}).get("triton", {})
    mean_batch = triton.get("decoder", {}).get("mean_batch_rows")
    offline = results.get("offline")
    if served != 1 and o32:
        add("offline_c32", None, 0.8, None, f"n/a: the stack served {served_text(results)}, the offline loop "
                                            "decodes one caption per row")
    elif o32 and mean_batch:
        same = _offline_at(offline, mean_batch)
        if same:
            share = ratio_estimate(o32["captions_per_s"], throughput_rel_se(o32), same["captions_per_s"], 0.0)
            add("offline_c32", share.value, 0.8, verdict(share, 0.8, True),
                f"{o32['captions_per_s']:.2f} captions/s vs offline {same['captions_per_s']:.2f} at batch "
                f"{same['batch']} (the decoder's mean batch at c=32 was {mean_batch:.1f} rows) = "
                f"{share.text(2)} (offline spread not recorded: counted as exact)")
        else:
            add("offline_c32", None, 0.8, None, "offline loop not run")
    else:
        add("offline_c32", None, 0.8, None, "concurrency 32 not run (or no Triton statistics)")

    cold = results.get("cold_start_s")
    # One start is the event the target is about: judged as measured.
    add("cold_start", cold, 30.0, None if cold is None else cold < 30.0, "external stack: not measured"
        if cold is None else f"{cold:.1f} s (server.py start -> /api/v1/health 200, one start)")
    return out


def markdown(results: dict) -> str:
    ours, base = results.get("gateway", []), results.get("baseline", [])
    rows = results["plan"]["rows_per_request"]
    lines = [f"# embcap benchmark ({results['mode']} run, {results['machine']['started_utc']} UTC)", ""]
    ck = results["checkpoint"]
    gen = ck["generation"]
    lines += [
        f"Checkpoint `{ck['name']}` ({ck['path']}): max_new_tokens {gen['max_new_tokens']}, "
        f"min_new_tokens {gen['min_new_tokens']}, do_sample {gen['do_sample']}, "
        f"{ck.get('candidates', '-')} candidates per row as shipped (rerank.candidates). "
        f"Our stack served {served_text(results)} in the perf_analyzer, gateway and overhead phases; the naive "
        "baseline and the offline loop decode greedily (one caption per row). "
        f"Requests: {rows} embeddings each (evaluator-shaped), closed loop, one keep-alive connection per client.",
        "",
        *_failures(results),
        f"## Load: our stack (gateway -> Triton, {served_text(results)}) vs the naive baseline (greedy)",
        "",
        *table("concurrency", "ours captions/s", "ours p50 ms", "ours p95 ms", "ours p99 ms", "ours errors",
               "decoder batch (mean rows)", "baseline captions/s", "baseline p50 ms", "baseline p95 ms",
               "baseline p99 ms", "baseline errors", "speed-up"),
    ]
    def errors(row: dict) -> str:
        late, refused = row.get("over_deadline", 0), row.get("refused", 0)
        return "-" if not row else f"{row['errors']}" + (f" ({refused} refused)" if refused else "") \
            + (f" (+{late} > 60 s)" if late else "")

    concurrencies = sorted({r["concurrency"] for r in ours + base})
    for c in concurrencies:
        o, b = level(ours, c) or {}, level(base, c) or {}
        batch = o.get("extra", {}).get("triton", {}).get("decoder", {}).get("mean_batch_rows")
        speed = o["captions_per_s"] / b["captions_per_s"] if o and b and b["captions_per_s"] else None
        lines.append(
            f"| {c} | {fmt(o.get('captions_per_s'), 2)} | {fmt(o.get('p50_ms'))} | {fmt(o.get('p95_ms'))} "
            f"| {fmt(o.get('p99_ms'))} | {errors(o)} | {fmt(batch)} | {fmt(b.get('captions_per_s'), 2)} "
            f"| {fmt(b.get('p50_ms'))} | {fmt(b.get('p95_ms'))} | {fmt(b.get('p99_ms'))} | {errors(b)} "
            f"| {fmt(speed, 2)}{'x' if speed else ''} |")
    lines.append("")
    lines.append("Requests per level (ours / baseline): " + ", ".join(
        f"c={c}: {(level(ours, c) or {}).get('requests', '-')}/{(level(base, c) or {}).get('requests', '-')}"
        for c in concurrencies)
        + ". Latency percentiles leave out each client's first request (ramp-up); throughput counts all. "
        "Errors: failed or timed-out requests (\"refused\": 503 over_capacity from the gateway's admission); "
        "\"> 60 s\": answered after the evaluator's 60 s deadline.")
    pa = results.get("perf_analyzer", [])
    if pa:
        lines += ["", f"## Triton direct (perf_analyzer, gRPC, no gateway, {served_text(results)})", "",
                  *table("concurrency", "requests", "captions/s", "p50 ms", "p95 ms", "p99 ms", "server queue ms",
                         "server compute ms")]
        for r in pa:
            if r.get("refused"):
                lines.append(f"| {r['concurrency']} | {r['requests']} | refused over capacity: "
                             f"{r['refused'][:120]} | - | - | - | - | - |")
                continue
            lines.append(f"| {r['concurrency']} | {r['requests']} | {fmt(r['captions_per_s'], 2)} | {fmt(r['p50_ms'])} "
                         f"| {fmt(r['p95_ms'])} | {fmt(r['p99_ms'])} | {fmt(r['server_queue_ms'])} "
                         f"| {fmt(r['server_compute_ms'])} |")
    offline = results.get("offline")
    if offline:
        engine = offline.get("engine", "hf")
        lines += ["", f"## Offline limit (decoder only, in-process, `{engine}` engine, one caption per row)", "",
                  *table("batch", "captions/s", "s per batch (best)", "repeats", "mean caption tokens")]
        for r in offline["results"]:
            lines.append(f"| {r['batch']} | {fmt(r['captions_per_s'], 2)} | {fmt(r['request_s'], 3)} "
                         f"| {r['repeats']} | {fmt(r['mean_caption_tokens'])} |")
    lines += ["", "## Targets", "", *table("target", "measured", "met", align="---")]
    for t in targets(results):
        word = {True: "met", False: "**missed**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {t['detail']} | {word} |")
    m = results["machine"]
    opts = results.get("export_options", {})
    lines += [
        "", "## Machine and settings", "",
        f"- CPU: {m['cpu']} ({m['logical_cpus']} logical CPUs, {m['cpus_usable']} usable; "
        f"{', '.join(m['cpu_flags'])}), {m['memory_gib']} GiB RAM, {m['platform']}",
        f"- Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, numpy {m['numpy']}",
        f"- Threads (decoder, baseline and offline alike): {results['thread_settings']['env']}, "
        f"decoder_threads={results['thread_settings']['decoder_threads']}; projector in Triton: ONNX Runtime, "
        f"{opts.get('projector_threads', '-')} thread",
        f"- Triton export: max_batch_size {opts.get('max_batch_size', '-')}, decoder engine "
        f"{opts.get('engine', '-')}, queue delay "
        + ("the engine default (embcap.engines.QUEUE_DELAY_US)" if opts.get("queue_delay_us") is None
           else f"{opts['queue_delay_us']} us")
        + f", dynamic batching {opts.get('dynamic_batching', '-')}, decoder instances "
          f"{opts.get('decoder_instances', '-')}",
        f"- Load average at start: {m['load_average_at_start']}, at end: {m.get('load_average_at_end', '-')}; "
        f"other busy processes at start: {'; '.join(m['busy_processes_at_start']) or 'none'}",
        "- CPU used by processes outside this benchmark, mean cores per phase (of "
        f"{m['cpus_usable']}): " + (", ".join(f"{k} {v:.2f}" for k, v in m.get("other_cpu_cores_by_phase", {}).items())
                                      or "not measured"),
        f"- Run wall time: {results.get('wall_s', 0):.0f} s",
    ]
    return "\n".join(lines) + "\n"


def _failures(results: dict) -> list[str]:
    """The failed phases with their errors, and those not run because of them (nothing when all ran)."""
    failed, skipped = results.get("failed_phases", {}), results.get("phases_not_run", {})
    interrupted = results.get("interrupted")
    if not failed and not skipped and not interrupted:
        return []
    lines = ["## Failed phases", "", "What these phases had measured before failing is kept in results.json; "
             "their tables below are partial or empty.", ""]
    lines += [f"- **{name}** failed after {failure.get('after_s', '-')} s: `{failure['error']}` "
              f"(traceback: {failure.get('traceback', '-')})" for name, failure in failed.items()]
    lines += [f"- {name} not run: {reason}" for name, reason in skipped.items()]
    if interrupted:
        lines.append(f"- the run was interrupted (`{interrupted}`) during phase "
                     f"{next(reversed(results.get('phase_seconds', {'-': 0})))}: later phases did not run")
    return lines + [""]


def plot(results: dict, path: Path) -> Path:
    plt = pyplot()
    rows = results["plan"]["rows_per_request"]
    ours, base = results.get("gateway", []), results.get("baseline", [])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for series, label, style in ((ours, f"ours (gateway -> Triton, {served_text(results)})", "o-"),
                                 (base, "naive baseline (greedy)", "s-")):
        if series:
            xs = [r["concurrency"] for r in series]
            left.plot(xs, [r["captions_per_s"] for r in series], style, label=label)
            right.plot(xs, [r["p95_ms"] / 1000 for r in series], style, label=label)
    offline = results.get("offline")
    if offline:
        pts = sorted(offline["results"], key=lambda r: r["batch"])
        left.plot([r["batch"] / rows for r in pts], [r["captions_per_s"] for r in pts], "k--", marker="^",
                  label=f"offline limit (batch = concurrency x {rows} rows)")
    pa = [r for r in results.get("perf_analyzer", []) if not r.get("refused")]
    if pa:
        left.plot([r["concurrency"] for r in pa], [r["captions_per_s"] for r in pa], "D", label="Triton direct")
        right.plot([r["concurrency"] for r in pa], [r["p95_ms"] / 1000 for r in pa], "D", label="Triton direct")
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent requests")
        axis.grid(True, alpha=0.3)
        if axis.get_legend_handles_labels()[1]:  # a phase that was skipped draws nothing to label
            axis.legend(fontsize=8)
    left.set_ylabel("captions / s")
    left.set_title("throughput")
    right.set_ylabel("p95 latency (s)")
    right.set_yscale("log")
    right.set_title("p95 latency")
    m = results["machine"]
    fig.suptitle(f"{results['checkpoint']['name']} on {m['cpu']} ({m['cpus_usable']} CPUs), {results['mode']} run",
                 fontsize=10)
    return save(fig, path)


def write(results: dict, out: Path) -> str:
    """Write report.md and plot.png into `out`; return the text to print (report + ratios)."""
    text = markdown(results)
    (out / "report.md").write_text(text + "\n![plot](plot.png)\n")
    plot(results, out / "plot.png")
    return text + "\n" + verdict_lines("Targets:", targets(results)) + "\n"
