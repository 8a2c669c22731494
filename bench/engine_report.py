"""Ratios, verdicts, table and plot for the engines phase (bench/engines.py).

Every verdict comes from a ratio of the two engines measured in the same run, with its
95% interval: "met" or "missed" only when the whole interval is on one side of the
target, "n/a" when noise straddles it or a figure is missing.
"""

from __future__ import annotations

from pathlib import Path

from bench.common import fmt, level, pyplot, verdict_lines
from tooling.stats import VERDICT_WORDS, Estimate, bootstrap_ratio, p50_ratio, throughput_ratio, verdict

NEW, REFERENCE = "continuous", "hf"


def p95_ratio(new: dict | None, old: dict | None) -> Estimate | None:
    """p95 latency of `new` over `old` (open loop), with a bootstrap 95% interval from every latency."""
    return bootstrap_ratio((new or {}).get("extra", {}).get("latencies_ms", []),
                           (old or {}).get("extra", {}).get("latencies_ms", []))


def targets(phase: dict) -> list[dict]:
    """The issue's CPU targets for the continuous engine against hf, each with its verdict."""
    engines = phase.get("engines", {})
    new, old = engines.get(NEW, {}), engines.get(REFERENCE, {})
    out = []

    def add(key: str, target: str, estimate: Estimate | None, threshold: float, higher: bool) -> None:
        detail = estimate.text(2, "x") if estimate else "not measured in this run"
        out.append({"key": key, "target": target, "value": estimate.value if estimate else None,
                    "threshold": threshold, "met": verdict(estimate, threshold, higher), "detail": detail})

    for c in (16, 32):
        add(f"realistic_c{c}", f"realistic inputs, c={c}: continuous >= 1.25x hf captions/s",
            throughput_ratio(level(new.get("realistic", []), c), level(old.get("realistic", []), c)), 1.25, True)
    add("open_loop_p95", f"open loop at {phase.get('open_loop_load', 0.8):.0%} of hf capacity: continuous p95 "
        "<= 0.7x hf", p95_ratio(new.get("open_loop"), old.get("open_loop")), 0.7, False)
    for c in (1, 16, 32):
        add(f"normal_c{c}", f"standard-normal inputs, c={c}: continuous >= 0.95x hf captions/s",
            throughput_ratio(level(new.get("normal", []), c), level(old.get("normal", []), c)), 0.95, True)
    add("normal_p50_c1", "standard-normal inputs, c=1: continuous p50 within 1.05x hf",
        p50_ratio(level(new.get("normal", []), 1), level(old.get("normal", []), 1)), 1.05, False)
    levels = new.get("normal", []) + new.get("realistic", []) + ([new["open_loop"]] if "open_loop" in new else [])
    late = sum(row.get("over_deadline", 0) for row in levels)
    out.append({"key": "nothing_late", "target": "continuous: nothing answered after 60 s", "value": late,
                "threshold": 0, "met": (late == 0) if levels else None,
                "detail": f"{late} answers after 60 s" if levels else "not measured in this run"})
    return out


def ratios_text(phase: dict) -> str:
    return verdict_lines("Engines (continuous vs hf, same run):", targets(phase))


def markdown(phase: dict) -> str:
    lines = ["# Decoding engines side by side", "",
             f"Same checkpoint, same load, one after the other. Open loop: Poisson arrivals of realistic requests "
             f"at {fmt(phase.get('open_loop_rate_rps'), 2)} requests/s ({phase.get('open_loop_load', 0):.0%} of "
             f"the hf engine's best closed-loop rate).", "",
             "| target | verdict | measured |", "|---|---|---|"]
    lines += [f"| {t['target']} | {VERDICT_WORDS[t['met']]} | {t['detail']} |" for t in targets(phase)]
    lines += ["", "| engine | inputs | concurrency | captions/s | p50 ms | p95 ms | errors | late (>60 s) |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, entry in phase.get("engines", {}).items():
        for kind in ("normal", "realistic"):
            for row in entry.get(kind, []):
                lines.append(f"| {name} | {kind} | {row['concurrency']} | {fmt(row['captions_per_s'], 2)} | "
                             f"{fmt(row['p50_ms'], 0)} | {fmt(row['p95_ms'], 0)} | {row['errors']} | "
                             f"{row.get('over_deadline', 0)} |")
        loop = entry.get("open_loop")
        if loop:
            lines.append(f"| {name} | realistic, open loop | - | {fmt(loop['captions_per_s'], 2)} | "
                         f"{fmt(loop['p50_ms'], 0)} | {fmt(loop['p95_ms'], 0)} | {loop['errors']} | "
                         f"{loop.get('over_deadline', 0)} |")
    lines += ["", "| engine | cold start s |", "|---|---:|"]
    lines += [f"| {name} | {fmt(entry.get('cold_start_s'))} |" for name, entry in phase.get("engines", {}).items()]
    return "\n".join(lines) + "\n"


def plot(phase: dict, path: Path) -> Path:
    """captions/s against concurrency, one line per engine and input kind."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for axis, kind in zip(axes, ("normal", "realistic")):
        for name, entry in phase.get("engines", {}).items():
            levels = entry.get(kind, [])
            axis.plot([level["concurrency"] for level in levels], [level["captions_per_s"] for level in levels],
                      marker="o", label=name)
        axis.set_title(f"{kind} inputs")
        axis.set_xlabel("concurrent requests")
        axis.set_ylabel("captions/s")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write(phase: dict, out: Path) -> str:
    """engines.md and engines.png in `out`; returns the ratio lines."""
    (out / "engines.md").write_text(markdown(phase))
    plot(phase, out / "engines.png")
    return ratios_text(phase)
