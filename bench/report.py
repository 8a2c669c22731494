"""results.json -> report.md (tables, targets, machine) and plot.png.

Longer than 250 lines: the statistics (Estimate, paired ratios, verdicts) and the one report
they feed (table, plot, verdict lines) change together.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from embcap.contract import ENSEMBLE

TARGETS = {
    "throughput_c16": "captions/s at concurrency 16 >= 4x the naive baseline",
    "latency_c1": "p50 latency at concurrency 1 <= 1.1x the baseline",
    "gateway_overhead": "gateway overhead at concurrency 1 (time outside Triton, gateway path - direct gRPC path, "
                        "paired per request) < 2 ms",
    "offline_c32": "captions/s at concurrency 32 >= 80% of offline throughput at the same batch size",
    "cold_start": "cold start (process start to healthy) < 30 s",
}


Z95 = 1.96  # two-sided 95% normal quantile
# Normal approximation: a latency distribution's standard deviation from its p50 and p95.
P95_SIGMAS = 1.645


@dataclass(frozen=True)
class Estimate:
    """A measured figure with its 95% interval; low/high None: its noise is unknown."""

    value: float
    low: float | None = None
    high: float | None = None

    @classmethod
    def around(cls, value: float, half_width: float | None) -> "Estimate":
        return cls(value) if half_width is None else cls(value, value - half_width, value + half_width)

    def text(self, digits: int = 2, unit: str = "") -> str:
        if self.low is None or self.high is None:
            return f"{self.value:.{digits}f}{unit} (spread unknown)"
        return f"{self.value:.{digits}f}{unit} [95% CI {self.low:.{digits}f} to {self.high:.{digits}f}]"


def verdict(estimate: Estimate | None, threshold: float, higher_is_better: bool) -> bool | None:
    """True (met) / False (missed) only when the whole 95% interval is on one side of the
    threshold; None (n/a) when it straddles it, or its noise is unknown, or nothing was measured."""
    if estimate is None or estimate.low is None or estimate.high is None:
        return None
    good_side = (lambda x: x >= threshold) if higher_is_better else (lambda x: x < threshold)
    ends = {good_side(estimate.low), good_side(estimate.high)}
    return ends.pop() if len(ends) == 1 else None


def _sigma_ms(level: dict) -> float | None:
    p50, p95 = level.get("p50_ms"), level.get("p95_ms")
    if p50 is None or p95 is None or math.isnan(p50) or math.isnan(p95):
        return None
    return max(p95 - p50, 0.0) / P95_SIGMAS


def _latency_samples(level: dict) -> int:
    return max(level.get("ok", 0) - level.get("ramp_requests", 0), 0) or level.get("ok", 0)


def median_se_ms(level: dict) -> float | None:
    """Standard error of a level's p50 latency (normal approximation: 1.2533 sigma / sqrt(n))."""
    sigma, n = _sigma_ms(level), _latency_samples(level)
    return None if sigma is None or n < 2 else 1.2533 * sigma / math.sqrt(n)


def throughput_rel_se(level: dict) -> float | None:
    """Relative standard error of a closed-loop level's captions/s (= that of its mean latency)."""
    sigma, n, mean = _sigma_ms(level), level.get("ok", 0), level.get("mean_ms") or level.get("p50_ms")
    return None if sigma is None or n < 2 or not mean else sigma / mean / math.sqrt(n)


def ratio_estimate(a: float, a_rel_se: float | None, b: float, b_rel_se: float | None) -> Estimate:
    """a / b with a 95% interval from the two relative standard errors (none when either is unknown)."""
    if a_rel_se is None or b_rel_se is None:
        return Estimate(a / b)
    return Estimate.around(a / b, Z95 * (a / b) * math.hypot(a_rel_se, b_rel_se))


def t95(df: int) -> float:
    """Two-sided 95% Student t quantile (the normal one from 30 degrees of freedom)."""
    table = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23,
             12: 2.18, 15: 2.13, 20: 2.09, 25: 2.06}
    if df >= 30:
        return Z95
    return table[max(k for k in table if k <= df)] if df >= 1 else math.inf


def paired_samples_estimate(samples: dict) -> Estimate | None:
    """Overhead from per-request samples (bench/overhead.py): mean time outside Triton on the
    gateway path minus that on the direct gRPC path, with a Welch 95% interval."""
    ours, direct = samples.get("gateway_outside_ms") or [], samples.get("direct_outside_ms") or []
    if len(ours) < 2 or len(direct) < 2:
        return None
    var_o, var_d = statistics.variance(ours) / len(ours), statistics.variance(direct) / len(direct)
    se = math.sqrt(var_o + var_d)
    df = (var_o + var_d) ** 2 / ((var_o ** 2 / (len(ours) - 1) + var_d ** 2 / (len(direct) - 1)) or math.inf)
    return Estimate.around(statistics.fmean(ours) - statistics.fmean(direct), t95(int(df)) * se)


def _level(rows: list[dict], concurrency: int) -> dict | None:
    return next((r for r in rows if r["concurrency"] == concurrency), None)


def _fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _offline_at(offline: dict | None, batch: float) -> dict | None:
    """The offline result at `batch`, or the nearest measured batch size."""
    if not offline or not offline.get("results"):
        return None
    return min(offline["results"], key=lambda r: (abs(r["batch"] - batch), -r["batch"]))


def outside_triton_ms(level: dict) -> float | None:
    """Mean client latency minus the captioner's mean time inside Triton for the same requests
    (Triton statistics): the client + gateway + network share, with decoder jitter cancelled."""
    server = level.get("extra", {}).get("triton", {}).get(ENSEMBLE, {}).get("server_ms_per_request")
    mean_all = level.get("mean_all_ms")
    if server is None or mean_all is None or math.isnan(mean_all):
        return None
    return mean_all - server


def paired_overhead(gateway_c1: dict, pa_c1: dict) -> tuple[float, float] | None:
    """(gateway path, perf_analyzer path) time outside Triton per request at concurrency 1, in ms."""
    ours, direct = outside_triton_ms(gateway_c1), outside_triton_ms(pa_c1)
    return None if ours is None or direct is None else (ours, direct)


def pairing_problem(level: dict, client_requests: int) -> str | None:
    """Why a level's client mean and Triton's mean do not cover the same requests, if they do not."""
    counted = level.get("extra", {}).get("triton", {}).get(ENSEMBLE, {}).get("requests")
    if counted is None:
        return "no Triton statistics"
    if counted != client_requests:
        return f"Triton counted {counted} requests, the client {client_requests}"
    return None


def _offline_exact(offline: dict | None, batch: int) -> dict | None:
    return next((r for r in (offline or {}).get("results", []) if r["batch"] == batch), None)


def targets(results: dict) -> list[dict]:
    """Each target with its measured value, threshold and verdict (None: not measurable in this run)."""
    ours, base = results.get("gateway", []), results.get("baseline", [])
    out = []

    def add(key: str, value, threshold, met, detail: str) -> None:
        out.append({"key": key, "target": TARGETS[key], "value": value, "threshold": threshold, "met": met,
                    "detail": detail})

    o16, b16 = _level(ours, 16), _level(base, 16)
    if o16 and b16 and b16["captions_per_s"] > 0:
        ratio = ratio_estimate(o16["captions_per_s"], throughput_rel_se(o16), b16["captions_per_s"], throughput_rel_se(b16))
        detail = f"{o16['captions_per_s']:.2f} vs {b16['captions_per_s']:.2f} captions/s = {ratio.text(unit='x')}"
        rows = results.get("plan", {}).get("rows_per_request", 4)
        small, large = (_offline_exact(results.get("offline"), b) for b in (rows, 16 * rows))
        if small and large:
            detail += (f" (ceiling from the offline loop: batch {16 * rows} / batch {rows} = "
                       f"{large['captions_per_s'] / small['captions_per_s']:.2f}x)")
        add("throughput_c16", ratio.value, 4.0, verdict(ratio, 4.0, True), detail)
    else:
        add("throughput_c16", None, 4.0, None, "concurrency 16 not run for both")

    o1, b1 = _level(ours, 1), _level(base, 1)
    if o1 and b1 and b1["p50_ms"] > 0:
        se_o, se_b = median_se_ms(o1), median_se_ms(b1)
        ratio = ratio_estimate(o1["p50_ms"], se_o and se_o / o1["p50_ms"], b1["p50_ms"], se_b and se_b / b1["p50_ms"])
        add("latency_c1", ratio.value, 1.1, verdict(ratio, 1.1, False),
            f"{o1['p50_ms']:.1f} vs {b1['p50_ms']:.1f} ms = {ratio.text(3, 'x')}")
    else:
        add("latency_c1", None, 1.1, None, "concurrency 1 not run for both")

    add("gateway_overhead", *_gateway_overhead(results, o1, _level(results.get("perf_analyzer", []), 1)))

    o32 = _level(ours, 32)
    triton = (o32 or {}).get("extra", {}).get("triton", {})
    mean_batch = triton.get("decoder", {}).get("mean_batch_rows")
    offline = results.get("offline")
    if o32 and mean_batch:
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
    if cold is not None:
        # One start is the event the target is about: judged as measured.
        add("cold_start", cold, 30.0, cold < 30.0, f"{cold:.1f} s (server.py start -> /api/v1/health 200, one start)")
    else:
        add("cold_start", None, 30.0, None, "external stack: not measured")
    return out


def _gateway_overhead(results: dict, o1: dict | None, pa1: dict | None) -> tuple:
    """(value, threshold, met, detail): the verdict comes from the paired figure only. Per-request
    samples (bench/overhead.py) give its interval; the per-level means alone give no spread, so
    from them the figure is shown with verdict n/a, as is the unpaired p50 difference, which
    the decoder's jitter dominates."""
    parts, estimate = [], None
    if o1 and pa1:
        unpaired = o1["p50_ms"] - pa1["p50_ms"]
        se_o, se_p = median_se_ms(o1), median_se_ms(pa1)
        spread = Z95 * math.hypot(se_o, se_p) if se_o is not None and se_p is not None else None
        parts.append(f"unpaired p50 difference (context only, decoder jitter included) {o1['p50_ms']:.1f} - "
                     f"{pa1['p50_ms']:.1f} ms = {Estimate.around(unpaired, spread).text(unit=' ms')}")
        paired = paired_overhead(o1, pa1)
        problem = pairing_problem(o1, o1.get("ok", 0)) or pairing_problem(pa1, pa1.get("requests", 0))
        if paired:
            parts.append(f"paired with Triton's own time for the same requests (level means): gateway path "
                         f"{paired[0]:.2f} ms vs perf_analyzer {paired[1]:.2f} ms outside Triton = "
                         f"{paired[0] - paired[1]:.2f} ms" + (f" ({problem}: not paired)" if problem else ""))
    samples = results.get("overhead_paired")
    if samples:
        estimate = paired_samples_estimate(samples)
        if estimate:
            parts.insert(0, f"paired per request over {len(samples['gateway_outside_ms'])} + "
                            f"{len(samples['direct_outside_ms'])} requests: {estimate.text(unit=' ms')}")
    if not parts:
        return None, 2.0, None, "gateway or perf_analyzer at concurrency 1 missing"
    if estimate is None:
        parts.append("no per-request spread recorded (python -m bench.overhead measures it): n/a")
    return (estimate.value if estimate else None), 2.0, verdict(estimate, 2.0, False), "; ".join(parts)


def markdown(results: dict) -> str:
    ours, base = results.get("gateway", []), results.get("baseline", [])
    rows = results["plan"]["rows_per_request"]
    lines = [f"# embcap benchmark ({results['mode']} run, {results['machine']['started_utc']} UTC)", ""]
    ck = results["checkpoint"]
    gen = ck["generation"]
    lines += [
        f"Checkpoint `{ck['name']}` ({ck['path']}): max_new_tokens {gen['max_new_tokens']}, "
        f"min_new_tokens {gen['min_new_tokens']}, do_sample {gen['do_sample']}. "
        f"Requests: {rows} embeddings each (evaluator-shaped), closed loop, one keep-alive connection per client.",
        "",
        "## Load: our stack (gateway -> Triton) vs the naive baseline",
        "",
        "| concurrency | ours captions/s | ours p50 ms | ours p95 ms | ours p99 ms | ours errors | decoder batch (mean rows) "
        "| baseline captions/s | baseline p50 ms | baseline p95 ms | baseline p99 ms | baseline errors | speed-up |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    def errors(level: dict) -> str:
        if not level:
            return "-"
        late = level.get("over_deadline", 0)
        return f"{level['errors']}" + (f" (+{late} > 60 s)" if late else "")

    for c in sorted({r["concurrency"] for r in ours + base}):
        o, b = _level(ours, c) or {}, _level(base, c) or {}
        batch = o.get("extra", {}).get("triton", {}).get("decoder", {}).get("mean_batch_rows")
        speed = o["captions_per_s"] / b["captions_per_s"] if o and b and b["captions_per_s"] else None
        lines.append(
            f"| {c} | {_fmt(o.get('captions_per_s'), 2)} | {_fmt(o.get('p50_ms'))} | {_fmt(o.get('p95_ms'))} "
            f"| {_fmt(o.get('p99_ms'))} | {errors(o)} | {_fmt(batch)} | {_fmt(b.get('captions_per_s'), 2)} "
            f"| {_fmt(b.get('p50_ms'))} | {_fmt(b.get('p95_ms'))} | {_fmt(b.get('p99_ms'))} | {errors(b)} "
            f"| {_fmt(speed, 2)}{'x' if speed else ''} |")
    lines.append("")
    lines.append("Requests per level (ours / baseline): " + ", ".join(
        f"c={c}: {(_level(ours, c) or {}).get('requests', '-')}/{(_level(base, c) or {}).get('requests', '-')}"
        for c in sorted({r["concurrency"] for r in ours + base}))
        + ". Latency percentiles leave out each client's first request (ramp-up); throughput counts all. "
        "Errors: failed or timed-out requests; \"> 60 s\": answered after the evaluator's 60 s deadline.")
    pa = results.get("perf_analyzer", [])
    if pa:
        lines += ["", "## Triton direct (perf_analyzer, gRPC, no gateway)", "",
                  "| concurrency | requests | captions/s | p50 ms | p95 ms | p99 ms | server queue ms | server compute ms |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in pa:
            lines.append(f"| {r['concurrency']} | {r['requests']} | {_fmt(r['captions_per_s'], 2)} | {_fmt(r['p50_ms'])} "
                         f"| {_fmt(r['p95_ms'])} | {_fmt(r['p99_ms'])} | {_fmt(r['server_queue_ms'])} "
                         f"| {_fmt(r['server_compute_ms'])} |")
    offline = results.get("offline")
    if offline:
        lines += ["", f"## Offline limit (decoder only, plain loop, `{offline.get('generator', 'hf')}` generate)", "",
                  "| batch | captions/s | s per batch | repeats | mean caption tokens |", "|---:|---:|---:|---:|---:|"]
        for r in offline["results"]:
            lines.append(f"| {r['batch']} | {_fmt(r['captions_per_s'], 2)} | {_fmt(r['seconds_per_batch_mean'], 3)} "
                         f"| {r['repeats']} | {_fmt(r['mean_caption_tokens'])} |")
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for t in targets(results):
        verdict = {True: "met", False: "**missed**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {t['detail']} | {verdict} |")
    m = results["machine"]
    opts = results.get("export_options", {})
    lines += [
        "", "## Machine and settings", "",
        f"- CPU: {m['cpu']} ({m['logical_cpus']} logical CPUs, {m['cpus_usable']} usable; {', '.join(m['cpu_flags'])}), "
        f"{m['memory_gib']} GiB RAM, {m['platform']}",
        f"- Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, numpy {m['numpy']}",
        f"- Threads (decoder, baseline and offline alike): {results['thread_settings']['env']}, "
        f"decoder_threads={results['thread_settings']['decoder_threads']}; projector in Triton: ONNX Runtime, "
        f"{opts.get('projector_threads', '-')} thread",
        f"- Triton export: max_batch_size {opts.get('max_batch_size', '-')}, decoder engine "
        f"{opts.get('engine', '-')}, queue delay "
        f"{'the engine default (embcap.engines.QUEUE_DELAY_US)' if opts.get('queue_delay_us') is None else str(opts['queue_delay_us']) + ' us'}"
        f", dynamic batching {opts.get('dynamic_batching', '-')}, decoder instances {opts.get('decoder_instances', '-')}",
        f"- Load average at start: {m['load_average_at_start']}, at end: {m.get('load_average_at_end', '-')}; "
        f"other busy processes at start: {'; '.join(m['busy_processes_at_start']) or 'none'}",
        "- CPU used by processes outside this benchmark, mean cores per phase (of "
        f"{m['cpus_usable']}): " + (", ".join(f"{k} {v:.2f}" for k, v in m.get("other_cpu_cores_by_phase", {}).items())
                                      or "not measured"),
        f"- Run wall time: {results.get('wall_s', 0):.0f} s",
    ]
    return "\n".join(lines) + "\n"


def ratios_text(results: dict) -> str:
    lines = ["Targets:"]
    for t in targets(results):
        verdict = {True: "MET", False: "MISSED", None: "n/a"}[t["met"]]
        lines.append(f"  [{verdict:6}] {t['target']}: {t['detail']}")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["plan"]["rows_per_request"]
    ours, base = results.get("gateway", []), results.get("baseline", [])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for series, label, style in ((ours, "ours (gateway -> Triton)", "o-"), (base, "naive baseline", "s-")):
        if series:
            xs = [r["concurrency"] for r in series]
            left.plot(xs, [r["captions_per_s"] for r in series], style, label=label)
            right.plot(xs, [r["p95_ms"] / 1000 for r in series], style, label=label)
    offline = results.get("offline")
    if offline:
        pts = sorted(offline["results"], key=lambda r: r["batch"])
        left.plot([r["batch"] / rows for r in pts], [r["captions_per_s"] for r in pts], "k--", marker="^",
                  label=f"offline limit (batch = concurrency x {rows} rows)")
    pa = results.get("perf_analyzer", [])
    if pa:
        left.plot([r["concurrency"] for r in pa], [r["captions_per_s"] for r in pa], "D", label="Triton direct")
        right.plot([r["concurrency"] for r in pa], [r["p95_ms"] / 1000 for r in pa], "D", label="Triton direct")
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent requests")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    left.set_ylabel("captions / s")
    left.set_title("throughput")
    right.set_ylabel("p95 latency (s)")
    right.set_yscale("log")
    right.set_title("p95 latency")
    m = results["machine"]
    fig.suptitle(f"{results['checkpoint']['name']} on {m['cpu']} ({m['cpus_usable']} CPUs), {results['mode']} run",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(results: dict, out: Path) -> str:
    """Write report.md and plot.png into `out`; return the text to print (report + ratios)."""
    text = markdown(results)
    (out / "report.md").write_text(text + "\n![plot](plot.png)\n")
    plot(results, out / "plot.png")
    return text + "\n" + ratios_text(results) + "\n"


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.report", description="re-render a run's report")
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    print(write(json.loads((args.run_dir / "results.json").read_text()), args.run_dir))


if __name__ == "__main__":
    main()
