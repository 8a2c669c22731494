"""What a training run leaves beside its checkpoint: the model card (markdown tables), the plot of loss and
held-out scores over steps, and the summary printed at the end. All of it is made from the training record
(`training.json`), so the three always agree with it."""

from __future__ import annotations

import json
from pathlib import Path

from training.card_compare import before_after_table, curve_table, fluency_table, objective_lines
from training.data import CORPUS_SPLIT

RECORD_FILE = "training.json"
CARD_FILE = "MODEL_CARD.md"
PLOT_FILE = "training.png"
LOG_FILE = "log.jsonl"
INPUT_SHAPES = {
    "realistic": "realistic: evaluator-shaped (mean of 15 unit clips around each row, norm 0.43-0.95)",
    "as-is": "as-is: the held-out conditioning vectors themselves",
}


def _decoder_line(record: dict) -> str:
    lora = record["lora"]
    if not lora:
        return f"- Decoder: `{record['decoder']}`, frozen"
    return (f"- Decoder: `{record['decoder']}`, LoRA (rank {lora['rank']}, alpha {lora['alpha']}, on "
            f"{', '.join(lora['modules'])}) merged into its weights")


def _projector_line(record: dict) -> str:
    norm = ("each embedding scaled to unit length first (`input_norm: unit` in caption_model.json: applied by the "
            "PyTorch projector and inside the exported ONNX graph, so the evaluator's norms below 1 look like "
            "training's), then" if record["input_norm"] == "unit" else "no input normalisation;")
    return (f"- Projector: {norm} Linear -> GELU -> LayerNorm -> Linear, 1024 -> {record['prefix_length']} prefix "
            f"vectors; prompt `{record['template']!r}`; greedy decoding, at most {record['max_new_tokens']} new tokens")


def _serving_line(record: dict) -> str:
    rerank = record.get("rerank") or {}
    if rerank.get("candidates", 1) <= 1:
        return "- Served: one caption per row, greedy"
    encoder = rerank.get("encoder", {})
    where = encoder.get("package") or encoder.get("path")
    return (f"- Served: best-of-{rerank['candidates']} (`rerank` in caption_model.json): the greedy caption and "
            f"{rerank['candidates'] - 1} sampled ones (temperature {rerank.get('temperature')}, top-k "
            f"{rerank.get('top_k')}) per row, the one whose embedding by `{where}` is closest to the input answered; "
            "the scores below are greedy (`python -m evaluate --candidates 1,2,4,8,16` gives the curve)")


def final_table(record: dict) -> list[str]:
    """Markdown rows: each input shape x judge, the model beside nearest-caption retrieval on the same rows."""
    final = record["scores"]["final"]
    if not final:
        return ["No final evaluation (--final-eval-samples 0)."]
    first = next(iter(final.values()))
    lines = [f"The written checkpoint, loaded as the server loads it, on {first['rows']} held-out rows, greedy, "
             f"engine `{first['engine']}`. Retrieval: the training caption nearest each input (cosine in the "
             "conditioning space), judged the same way.", "",
             "| inputs | judge | this model | nearest training caption | model - retrieval |",
             "|---|---|---:|---:|---:|"]
    for shape, score in final.items():
        for judge, value in score["judges"].items():
            base = score["retrieval"].get(judge)
            diff = "" if base is None else f"{value - base:+.4f}"
            lines.append(f"| {INPUT_SHAPES.get(shape, shape)} | {judge} | **{value:.4f}** | "
                         f"{'-' if base is None else f'{base:.4f}'} | {diff} |")
    if len(final) > 1:
        (one, a), (other, b) = list(final.items())[:2]
        lines += ["", f"{one} minus {other} inputs: "
                  + ", ".join(f"{judge} {a['judges'][judge] - b['judges'][judge]:+.4f}" for judge in a["judges"]) + "."]
    return lines


def history_table(record: dict) -> list[str]:
    """Markdown rows of the held-out scores taken during training."""
    history = record["scores"]["history"]
    if not history:
        return []
    judges = list(history[0]["judges"])
    fluent = all(entry.get("fluency") for entry in history)
    lines = [f"During training ({history[0]['rows']} held-out rows, {record['scores']['eval_inputs']} inputs, "
             f"engine `{history[0]['engine']}`):", "",
             "| step | loss (EMA) | " + " | ".join(judges) + (" | degenerate | mean words |" if fluent else " |"),
             "|---|---:|" + "---:|" * (len(judges) + 2 * fluent)]
    for entry in history:
        loss = "-" if entry.get("loss") is None else f"{entry['loss']:.3f}"
        extra = (f" | {100 * entry['fluency']['degenerate']:.1f}% | {entry['fluency']['mean_words']:.2f}"
                 if fluent else "")
        lines.append(f"| {entry['step']} | {loss} | " + " | ".join(f"{entry['judges'][j]:.4f}" for j in judges)
                     + extra + " |")
    retrieval = history[0].get("retrieval") or {}
    if retrieval:
        lines.append("| nearest training caption, same rows | | "
                     + " | ".join(f"{retrieval.get(j, float('nan')):.4f}" for j in judges) + " |")
    return lines


def model_card(record: dict) -> str:
    """MODEL_CARD.md of a trained checkpoint: what it is, the data, the input noise model, the run and its scores."""
    data, noise = record["data"], record["noise_model"]
    minutes = (f"{record['train_minutes']} min of training, {record['total_minutes']} min with the final evaluation"
               if "total_minutes" in record else f"{record['train_minutes']} min")
    lines = [f"# `{record['name']}`", "",
             f"Written by `python -m training`; the same record is in `{RECORD_FILE}`, the curves in `{PLOT_FILE}`.",
             "", "## Model", _decoder_line(record), _projector_line(record), _serving_line(record),
             "", "## Data",
             f"- Files: {', '.join(f'`{f}`' for f in data['files'])}",
             f"- Conditioning: `{data['conditioning']}`"
             + (" (`embcap.text_encoder`: all-MiniLM-L6-v2 lifted to 1024-d; the model captions vectors near "
                "caption embeddings in that space, not ImageBind video embeddings)"
                if data["conditioning"] == "encoder" else "")
             + f"; target: `{data['target']}`, cut to {record['max_caption_tokens']} tokens",
             f"- Rows: {data['train_rows']} training, {data['heldout_rows']} held out ({data['split']})",
             f"- Input noise model (`{RECORD_FILE}` `noise_model`): {_describe(noise)}",
             "", "## Training",
             f"- `{record['command']}`",
             f"- {record['steps']} steps of {record['examples_per_step']} rows ({record['examples_seen']} seen), "
             f"stopped by {'the time budget' if record.get('stopped_by') == 'time' else 'the step count'}; seed "
             f"{record['seed']}, {record['device']} {record['dtype']}, {minutes}",
             f"- Final training loss (EMA) {record['final_loss']}", *objective_lines(record),
             "", f"## Held-out scores (judges: {', '.join(record['judges'])})", "", *final_table(record), "",
             *_section(fluency_table(record)), *history_table(record), "",
             f"![loss and held-out scores over steps]({PLOT_FILE})", *_section(before_after_table(record), first=True),
             *_section(curve_table(record), first=True)]
    final = record["scores"]["final"]
    if final:
        shape, score = next(iter(final.items()))
        lines += ["", f"Examples ({shape} inputs, reference -> generated):"]
        lines += [f"- {ref!r} -> {gen!r}" for ref, gen in score["examples"]]
    lines += ["", "## Reproduce", f"- `{record['command']}` (resumable: re-run it with the same `--run-dir`)"]
    if data["split"].startswith(CORPUS_SPLIT):
        lines.append("- Score this folder again on all of `heldout.txt`, both input shapes, both judges and retrieval: "
                     "`make evaluate-heldout CHECKPOINT=<this folder>` (`python -m evaluate`)")
    return "\n".join(lines) + "\n"


def _section(lines: list[str], first: bool = False) -> list[str]:
    """`lines` with a blank line after them (`first`: before them), nothing when empty."""
    if not lines:
        return []
    return ["", *lines] if first else [*lines, ""]


def _describe(noise: dict) -> str:
    from training.augment import NoiseModel

    return NoiseModel(noise["augment"], noise["fraction"], noise["noise_std"], noise["clips_per_embedding"],
                      tuple(noise["clip_cosine_range"])).describe()


def read_log(path: Path) -> list[dict]:
    """The per-step records of log.jsonl, the last one of each step (a resumed run repeats the steps after its
    last saved state)."""
    if not path.is_file():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            by_step[entry["step"]] = entry
    return [by_step[step] for step in sorted(by_step)]


def write_plot(log_path: Path, record: dict, out: Path) -> Path:
    """A PNG of the training loss (per step and smoothed) and the held-out scores over steps, with the retrieval
    baseline of the same rows as dashed lines and the final scores as points at the last step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = read_log(log_path)
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    if steps:
        xs, losses = [e["step"] for e in steps], [e["loss"] for e in steps]
        smoothed, value = [], None
        for loss in losses:
            value = loss if value is None else 0.98 * value + 0.02 * loss
            smoothed.append(value)
        top.plot(xs, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="loss")
        top.plot(xs, smoothed, color="tab:blue", label="loss (EMA 0.98)")
    top.set_ylabel("training loss")
    top.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7)
    rewards = [(e["step"], e["reward"]) for e in steps if "reward" in e]
    if rewards:  # a reward objective: the mean reward of the sampled captions, on its own axis
        twin = top.twinx()
        twin.plot(*zip(*rewards), color="tab:green", alpha=0.4, linewidth=0.8, label="mean sample reward")
        twin.set_ylabel("mean sample reward", color="tab:green")
    top.set_title(f"{record['name']}: {record['steps']} steps")
    colours = ["tab:orange", "tab:green", "tab:red", "tab:purple"]
    history = record["scores"]["history"]
    judges = list(history[0]["judges"]) if history else list(record["judges"])
    for colour, judge in zip(colours, judges):
        if history:
            bottom.plot([h["step"] for h in history], [h["judges"][judge] for h in history], "o-", color=colour,
                        label=f"{judge} ({record['scores']['eval_inputs']} inputs, {history[0]['rows']} rows)")
            base = history[0].get("retrieval", {}).get(judge)
            if base is not None:
                bottom.axhline(base, color=colour, linestyle="--", linewidth=1,
                               label=f"{judge}: nearest training caption ({history[0]['rows']} rows)")
        for shape, score in record["scores"]["final"].items():
            if judge in score["judges"]:
                bottom.plot([record["steps"]], [score["judges"][judge]], "*" if shape == "realistic" else "s",
                            color=colour, markersize=10, label=f"{judge}: final, {shape} ({score['rows']} rows)")
    bottom.set_xlabel("step")
    bottom.set_ylabel("held-out mean cosine")
    if bottom.lines:
        bottom.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def print_summary(record: dict, out: Path) -> None:
    """The final summary on stdout: the run, then the final scores as a table."""
    print("\n== training summary ==")
    rows = [("checkpoint", out), ("steps", f"{record['steps']} (stopped by {record['stopped_by']})"),
            ("examples seen", record["examples_seen"]), ("train minutes", record["train_minutes"]),
            ("total minutes", record["total_minutes"]), ("final loss", record["final_loss"]),
            ("input norm", record["input_norm"]), ("plot", out / PLOT_FILE)]
    for key, value in rows:
        print(f"{key:>16}: {value}")
    print("\n".join(final_table(record)))
    final = record["scores"]["final"]
    for ref, gen in (next(iter(final.values()))["examples"][:3] if final else []):
        print(f"  ref: {ref}\n  gen: {gen}")
    print(f"serve it: make serve CHECKPOINT={out}")
