"""The model card's sections on caption fluency, the best-of-N curve and, for a run that continued a
checkpoint, the scores before and after (all read from the training record, `training.json`)."""

from __future__ import annotations

FLUENCY_COLUMNS = (("degenerate", "degenerate"), ("empty", "empty"), ("repeated_words", "repeated words"),
                   ("over_token_limit", "at the token limit"), ("mean_words", "mean words"))


def _share(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _fluency_cells(fluency: dict) -> str:
    cells = [(f"{fluency[key]:.2f}" if key == "mean_words" else _share(fluency.get(key))) for key, _ in FLUENCY_COLUMNS]
    return " | ".join(cells)


def _change(entry: dict, judge: str, old: float, new: float) -> str:
    """The paired change with its 95% interval when the record has it, else the plain difference."""
    change = entry.get("change", {}).get(judge)
    if not change:
        return f"{new - old:+.4f}"
    return f"{change[0]:+.4f} [{change[1]:+.4f}, {change[2]:+.4f}]"


def fluency_table(record: dict) -> list[str]:
    """Degenerate captions (evaluate.fluency) of the final greedy scores, and of the served best-of-N caption."""
    scores = record["scores"]
    rows = [(f"{shape}, greedy ({score['rows']} rows)", score["fluency"]) for shape, score in scores["final"].items()
            if score.get("fluency")]
    before = scores.get("before", {})
    rows = [(f"after: {name}", fluency) for name, fluency in rows] if before else rows
    rows += [(f"before: {shape}, greedy ({score['rows']} rows)", score["fluency"])
             for shape, score in before.get("final", {}).items() if score.get("fluency")]
    for label, curve in (("after", scores.get("curve")), ("before", before.get("curve"))):
        if curve:
            top = max(curve, key=int)
            prefix = f"{label}: " if before else ""
            rows.append((f"{prefix}{scores['curve_inputs']}, best-of-{top} ({scores['curve_rows']} rows)",
                         curve[top]["fluency"]))
    if not rows:
        return []
    return ["Degenerate captions (`evaluate.fluency`: empty after stripping or the blank fallback, a word n-gram "
            "repeated back to back, or as many tokens as the generation limit):", "",
            "| captions | " + " | ".join(name for _, name in FLUENCY_COLUMNS) + " |",
            "|---|" + "---:|" * len(FLUENCY_COLUMNS),
            *[f"| {label} | {_fluency_cells(fluency)} |" for label, fluency in rows]]


def curve_table(record: dict) -> list[str]:
    """The best-of-N curve per judge (before and after with --init-from), retrieval last."""
    scores = record["scores"]
    curve = scores.get("curve")
    if not curve:
        return []
    before = scores.get("before", {}).get("curve")
    judges = list(next(iter(curve.values()))["judges"])
    head = [f"{judge}{' before | ' + judge + ' after' if before else ''}" for judge in judges]
    lines = [f"## Best-of-N ({scores['curve_rows']} held-out rows, {scores['curve_inputs']} inputs; the served "
             "caption is the reranker's choice among N)", "",
             f"`python -m evaluate --checkpoint <folder> --candidates {','.join(curve)} --norms "
             f"{scores['curve_inputs']} --limit {scores['curve_rows']} --seed {record['seed']}` scores the same rows.",
             "", "| candidates per row | " + " | ".join(head) + " |",
             "|---:|" + "---:|" * (len(judges) * (2 if before else 1))]
    for count, entry in curve.items():
        cells = []
        for judge in judges:
            after = entry["judges"][judge]
            if before:
                old = before[count]["judges"][judge]
                cells += [f"{old:.4f}", f"{after:.4f} ({_change(entry, judge, old, after)})"]
            else:
                cells.append(f"{after:.4f}")
        lines.append(f"| {count} | " + " | ".join(cells) + " |")
    retrieval = scores.get("curve_retrieval", {})
    if retrieval:
        cells = [f"{retrieval[j]:.4f}" for j in judges for _ in range(2 if before else 1)]
        lines.append("| nearest training caption | " + " | ".join(cells) + " |")
    return lines


def before_after_table(record: dict) -> list[str]:
    """Greedy scores of the checkpoint continued and of this one, per input shape and judge."""
    before = record["scores"].get("before")
    if not before:
        return []
    lines = [f"## Before and after (greedy; before: `{before['checkpoint']}`, scored by this run on the same rows)",
             "", "Changes are paired over the rows, with 95% intervals.", "",
             "| inputs | judge | before | after | change |", "|---|---|---:|---:|---:|"]
    for shape, score in record["scores"]["final"].items():
        old = before["final"].get(shape)
        for judge, value in score["judges"].items():
            if old and judge in old["judges"]:
                lines.append(f"| {shape} ({score['rows']} rows) | {judge} | {old['judges'][judge]:.4f} | "
                             f"**{value:.4f}** | {_change(score, judge, old['judges'][judge], value)} |")
    return lines


def objective_lines(record: dict) -> list[str]:
    """The training section's lines on the objective and the checkpoint continued."""
    from training.reward import ObjectiveSettings

    objective = record.get("objective") or {"name": "ce"}
    lines = []
    if record.get("init_from"):
        minutes = record.get("before_minutes")
        lines.append(f"- Continued from `{record['init_from']}` (its projector{', decoder' if record['lora'] else ''} "
                     "and settings; scored before training" + (f" in {minutes} min" if minutes is not None else "")
                     + ")")
    if objective["name"] != "ce":
        lines.append(f"- Objective `{objective['name']}`: {ObjectiveSettings(**objective).describe()}")
    return lines


__all__ = ["before_after_table", "curve_table", "fluency_table", "objective_lines"]
