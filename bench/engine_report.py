"""Ratios, verdicts, table and plot for the engines phase (bench/engines.py).

Every verdict comes from a ratio of the two engines measured in the same run, with its
95% interval: "met" or "missed" only when the whole interval is on one side of the
target, "n/a" when noise straddles it or a figure is missing.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from bench.report import Estimate, median_se_ms, ratio_estimate, throughput_rel_se, verdict

NEW, REFERENCE = "continuous", "hf"
VERDICT_WORDS = {True: "MET", False: "MISSED", None: "n/a"}


def _level(levels: list[dict], concurrency: int) -> dict | None:
    return next((level for level in levels if level["concurrency"] == concurrency), None)


def throughput_ratio(new: dict | None, old: dict | None) -> Estimate | None:
    """captions/s of `new` over `old` at one level."""
    if not new or not old or old["captions_per_s"] <= 0:
        return None
    return ratio_estimate(new["captions_per_s"], throughput_rel_se(new), old["captions_per_s"], throughput_rel_se(old))


def p50_ratio(new: dict | None, old: dict | None) -> Estimate | None:
    if not new or not old or old["p50_ms"] <= 0:
        return None
    se_new, se_old = median_se_ms(new), median_se_ms(old)
    return ratio_estimate(new["p50_ms"], se_new and se_new / new["p50_ms"], old["p50_ms"], se_old and se_old / old["p50_ms"])


def p95_ratio(new: dict | None, old: dict | None, resamples: int = 2000, seed: int = 0) -> Estimate | None:
    """p95 latency of `new` over `old` (open loop), with a bootstrap 95% interval from every latency."""
    a = np.asarray((new or {}).get("extra", {}).get("latencies_ms", []))
    b = np.asarray((old or {}).get("extra", {}).get("latencies_ms", []))
    if len(a) < 5 or len(b) < 5:
        return None
    rng = np.random.default_rng(seed)
    ratios = [np.percentile(rng.choice(a, len(a)), 95) / np.percentile(rng.choice(b, len(b)), 95)
              for _ in range(resamples)]
    low, high = np.percentile(ratios, [2.5, 97.5])
    return Estimate(float(np.percentile(a, 95) / np.percentile(b, 95)), float(low), float(high))


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
            throughput_ratio(_level(new.get("realistic", []), c), _level(old.get("realistic", []), c)), 1.25, True)
    add("open_loop_p95", f"open loop at {phase.get('open_loop_load', 0.8):.0%} of hf capacity: continuous p95 "
        "<= 0.7x hf", p95_ratio(new.get("open_loop"), old.get("open_loop")), 0.7, False)
    for c in (1, 16, 32):
        add(f"normal_c{c}", f"standard-normal inputs, c={c}: continuous >= 0.95x hf captions/s",
            throughput_ratio(_level(new.get("normal", []), c), _level(old.get("normal", []), c)), 0.95, True)
    add("normal_p50_c1", "standard-normal inputs, c=1: continuous p50 within 1.05x hf",
        p50_ratio(_level(new.get("normal", []), 1), _level(old.get("normal", []), 1)), 1.05, False)
    levels = new.get("normal", []) + new.get("realistic", []) + ([new["open_loop"]] if "open_loop" in new else [])
    late = sum(level.get("over_deadline", 0) for level in levels)
    out.append({"key": "nothing_late", "target": "continuous: nothing answered after 60 s", "value": late,
                "threshold": 0, "met": (late == 0) if levels else None,
                "detail": f"{late} answers after 60 s" if levels else "not measured in this run"})
    return out


def ratios_text(phase: dict) -> str:
    """One line per target: [MET|MISSED|n/a] target: ratio [95% CI]."""
    lines = ["Engines (continuous vs hf, same run):"]
    for t in targets(phase):
        lines.append(f"  [{VERDICT_WORDS[t['met']]:6}] {t['target']}: {t['detail']}")
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown(phase: dict) -> str:
    lines = ["# Decoding engines side by side", "",
             f"Same checkpoint, same load, one after the other. Open loop: Poisson arrivals of realistic requests "
             f"at {_fmt(phase.get('open_loop_rate_rps'), 2)} requests/s ({phase.get('open_loop_load', 0):.0%} of "
             f"the hf engine's best closed-loop rate).", "",
             "| target | verdict | measured |", "|---|---|---|"]
    lines += [f"| {t['target']} | {VERDICT_WORDS[t['met']]} | {t['detail']} |" for t in targets(phase)]
    lines += ["", "| engine | inputs | concurrency | captions/s | p50 ms | p95 ms | errors | late (>60 s) |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, entry in phase.get("engines", {}).items():
        for kind in ("normal", "realistic"):
            for level in entry.get(kind, []):
                lines.append(f"| {name} | {kind} | {level['concurrency']} | {_fmt(level['captions_per_s'], 2)} | "
                             f"{_fmt(level['p50_ms'], 0)} | {_fmt(level['p95_ms'], 0)} | {level['errors']} | "
                             f"{level.get('over_deadline', 0)} |")
        loop = entry.get("open_loop")
        if loop:
            lines.append(f"| {name} | realistic, open loop | - | {_fmt(loop['captions_per_s'], 2)} | "
                         f"{_fmt(loop['p50_ms'], 0)} | {_fmt(loop['p95_ms'], 0)} | {loop['errors']} | "
                         f"{loop.get('over_deadline', 0)} |")
    lines += ["", "| engine | cold start s |", "|---|---:|"]
    lines += [f"| {name} | {_fmt(entry.get('cold_start_s'))} |" for name, entry in phase.get("engines", {}).items()]
    return "\n".join(lines) + "\n"


def plot(phase: dict, path: Path) -> Path:
    """captions/s against concurrency, one line per engine and input kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for axis, kind in zip(axes, ("normal", "realistic")):
        for name, entry in phase.get("engines", {}).items():
            levels = entry.get(kind, [])
            axis.plot([l["concurrency"] for l in levels], [l["captions_per_s"] for l in levels], marker="o", label=name)
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
