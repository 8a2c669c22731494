"""`python -m evaluate`: score a running endpoint (or a checkpoint in-process) like the real evaluator."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from evaluate.curve import curve_markdown, in_process_runs, parse_counts, plot_curve
from evaluate.datasets import NORMS, cached_encoding, load_dataset
from tooling.evaluator import ENDPOINTS, HEALTH, NotReady, run_requests, wait_ready
from evaluate.judges import load_judge
from evaluate.report import build_report, markdown, retrieval_baseline, score_rows, write_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m evaluate", description=__doc__)
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of a running stack")
    target.add_argument("--checkpoint", type=Path, help="generate in-process from a checkpoint (no HTTP)")
    parser.add_argument("--dataset", default="heldout",
                        help="'heldout' (built-in split), a captions file, or parquet file/folder")
    parser.add_argument("--limit", type=int, default=None, help="score a seeded random subset of N rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--norms", choices=NORMS, default="as-is",
                        help="'realistic': send each row as the mean of 15 unit vectors around it (norm mostly "
                             "0.5-0.9, like the evaluator's video embeddings); 'as-is': the dataset's (unit) vectors")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per request (the evaluator sends 4)")
    parser.add_argument("--candidates", type=parse_counts, default=None,
                        help="with --checkpoint: captions decoded per row and reranked, N or a list such as "
                             "1,2,4,8,16 for the quality-vs-N curve (default: the checkpoint's rerank.candidates)")
    parser.add_argument("--endpoint", default="inference", help=f"{' or '.join(ENDPOINTS)} or a path")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, s (30 in the earliest)")
    parser.add_argument("--health", choices=[*HEALTH, "none"], default="o1", help="readiness rules to apply")
    parser.add_argument("--health-timeout", type=float, default=None, help="override the overall health deadline")
    parser.add_argument("--judge", default="minilm",
                        help="minilm, mpnet, a sentence-transformers folder, an imported ImageBind text tower folder "
                             "(the evaluator's own scorer: python -m training.import_text_tower), or mod:fn")
    parser.add_argument("--also-judge", action="append", default=[], help="extra judges reported alongside")
    parser.add_argument("--baseline-train", type=Path, help="training captions file for the retrieval baseline")
    parser.add_argument("--baseline-corpus", action="store_true",
                        help="rebuild the default training corpus from WordNet for the retrieval baseline")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="where the JSON and markdown go")
    parser.add_argument("--name", default=None, help="report file stem (default: evaluate-<time>)")
    parser.add_argument("--min-score", type=float, default=None, help="exit 1 if the mean similarity is lower")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.candidates and not args.checkpoint:
        parser.error("--candidates applies to --checkpoint: a server decodes as it was exported (--candidates)")
    return args


def training_captions(args: argparse.Namespace) -> list[str] | None:
    """Captions for the retrieval baseline, if asked for."""
    if args.baseline_train:
        from embcap.captions_file import read_caption_lines

        return read_caption_lines(args.baseline_train)[0]
    if args.baseline_corpus:
        from tooling.corpus import build_corpus

        return [c.text for c in build_corpus().train]
    return None


def fluency_of(checkpoint: Path | None):
    """captions -> evaluate.fluency's shares; with a checkpoint its tokenizer and limit judge "at the token limit"."""
    from evaluate.fluency import fluency, token_counter

    if checkpoint is None:
        return fluency
    from transformers import AutoTokenizer

    from embcap.loading import resolve_checkpoint

    resolved = resolve_checkpoint(checkpoint)
    counter = token_counter(AutoTokenizer.from_pretrained(resolved.decoder_dir))
    return lambda captions: fluency(captions, counter, resolved.spec.generation.max_new_tokens)


def quiet_progress() -> None:
    """No progress bar from any library. tqdm and transformers read these switches when first imported
    (which `python -m evaluate` has not done yet); a transformers already loaded is told directly."""
    os.environ["TQDM_DISABLE"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    progress = not args.quiet
    if args.quiet:
        quiet_progress()
    if not args.checkpoint:  # first: a missing server is said at once, not after the dataset is built
        try:
            waited = wait_ready(args.url, args.health, args.health_timeout)
        except NotReady as exc:
            print(f"evaluate: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        print(f"{args.url} ready after {waited:.1f} s ({args.health} health rules)")
    dataset = load_dataset(args.dataset).sample(args.limit, args.seed).with_norms(args.norms, args.seed)
    print(f"dataset {dataset.name}: {len(dataset)} rows, embeddings {list(dataset.embeddings.shape)}")
    if args.checkpoint:
        target = f"checkpoint {args.checkpoint} (in-process)"
        runs = in_process_runs(args.checkpoint, dataset.embeddings, args.batch_size, args.candidates, progress)
    else:
        target = args.url
        runs = {None: run_requests(args.url, dataset.embeddings, args.batch_size, args.endpoint, args.timeout,
                                   progress)}
    judge_name, judge = load_judge(args.judge)
    judges = [(judge_name, judge)]
    for spec in args.also_judge:
        try:
            judges.append(load_judge(spec))
        except (FileNotFoundError, ValueError, ImportError) as exc:
            print(f"judge {spec!r} skipped: {exc}", file=sys.stderr)
    baseline, extra_baseline, retrieval = None, {}, {}
    train = training_captions(args)
    if train:
        baseline = retrieval_baseline(judge, dataset.embeddings, dataset.references, train,
                                      cached_encoding(train, progress).astype(np.float32))
        # the same picked captions, judged by every other judge
        extra_baseline = {name: score_rows(other, baseline[1], dataset.references) for name, other in judges[1:]}
        retrieval = {judge_name: float(np.mean(baseline[0])),
                     **{name: float(np.mean(scores)) for name, scores in extra_baseline.items()}}
    settings = {"batch_size": args.batch_size, "endpoint": ENDPOINTS.get(args.endpoint, args.endpoint),
                "timeout_s": args.timeout, "health": args.health, "limit": args.limit, "seed": args.seed,
                "norms": args.norms,
                "baseline_train_captions": len(train) if train else None}
    stem = args.name or time.strftime("evaluate-%Y%m%d-%H%M%S")
    reports, curve = {}, []
    shares = fluency_of(args.checkpoint)
    for count, run in runs.items():
        captions = run.captions(len(dataset))
        scores = score_rows(judge, captions, dataset.references)
        extra = {name: score_rows(other, captions, dataset.references) for name, other in judges[1:]}
        report = build_report(dataset_name=dataset.name, references=dataset.references, sources=dataset.sources,
                              run=run, scores=scores, judge_name=judge_name, target=target,
                              settings={**settings, "candidates": count}, extra_judges=extra, baseline=baseline,
                              extra_baselines=extra_baseline,
                              fluency=shares([c for c in captions if c is not None]).record())
        reports[count] = report
        suffix = f"-n{count}" if len(runs) > 1 else ""
        json_path, md_path = write_report(report, args.out, stem + suffix)
        if len(runs) == 1:
            print(markdown(report))
        print(f"report: {json_path} and {md_path}")
        curve.append({"candidates": count, "scores": {judge_name: report["mean_similarity"],
                                                      **report.get("other_judges", {})}})
    if len(runs) > 1:
        names = [name for name, _ in judges]
        table = curve_markdown(curve, names, retrieval)
        (Path(args.out) / f"{stem}-curve.md").write_text(f"## Quality against candidates per row: {target}, "
                                                         f"{dataset.name} ({len(dataset)} rows)\n\n{table}")
        (Path(args.out) / f"{stem}-curve.json").write_text(
            json.dumps({"curve": curve, "retrieval": retrieval}, indent=2) + "\n")
        plot = plot_curve(curve, names, Path(args.out) / f"{stem}-curve.png", retrieval)
        print(table)
        print(f"curve: {Path(args.out) / (stem + '-curve.md')}" + (f" and {plot}" if plot else ""))
    report = reports[max(reports, key=lambda count: count or 0)]
    if args.min_score is not None and report["mean_similarity"] < args.min_score:
        print(f"mean similarity {report['mean_similarity']:.4f} is below --min-score {args.min_score}", file=sys.stderr)
        raise SystemExit(1)
    return report
