"""Write captions as parquet in the evaluator's layout, embedded with the project's encoder.

    python -m training.to_parquet --captions wordnet --out data/wordnet   # train.parquet + heldout.parquet
    python -m training.to_parquet --captions my_captions.txt --out data/mine

A captions file is UTF-8 text, one caption per line, or ``SOURCE<TAB>caption`` (SOURCE tags the row,
e.g. ``scene``); blank lines and lines starting with ``#`` are skipped. Each row: ``video_embed`` =
`embcap.text_encoder.encode_captions(description)` scaled to
`--norm` (the evaluator's video embeddings have norms of about 0.5-0.9), ``description`` and a
``video_id``. The WordNet corpus keeps its own held-out split (``heldout.parquet``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from training.data import (CAPTIONS_FORMAT, WORDNET, DataError, Examples, captions_examples, read_captions_file,
                           write_parquet)


def to_examples(captions: list[str], norm: float, prefix: str) -> Examples:
    """Encoder embeddings of `captions` (scaled to `norm`), one video id per caption."""
    from embcap.text_encoder import encode_captions

    vectors = (norm * encode_captions(captions, batch_size=128, progress=True)).astype(np.float32)
    return Examples(texts=captions, embeddings=vectors, video_ids=[f"{prefix}-{i}" for i in range(len(captions))])


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, prog="python -m training.to_parquet", description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--captions", default=WORDNET, help=f"{CAPTIONS_FORMAT}; or 'wordnet' (the default corpus)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the parquet files")
    parser.add_argument("--norm", type=float, default=1.0, help="row norm of video_embed (at most 1)")
    parser.add_argument("--max-train", type=int, default=80000, help="training captions of the wordnet corpus")
    parser.add_argument("--heldout-size", type=int, default=1000, help="held-out captions of the wordnet corpus")
    parser.add_argument("--seed", type=int, default=0, help="seed of the wordnet corpus and its split")
    args = parser.parse_args(argv)
    if not 0 < args.norm <= 1:
        parser.error("--norm must be in (0, 1]")
    written = []
    if args.captions == WORDNET:
        from tooling.corpus import build_corpus

        corpus = build_corpus(seed=args.seed, heldout_size=args.heldout_size, max_train=args.max_train)
        for name, part in (("train", corpus.train), ("heldout", corpus.heldout)):
            examples = to_examples([c.text for c in part], args.norm, name)
            written.append(write_parquet(args.out / f"{name}.parquet", examples))
    else:
        captions, sources = read_captions_file(args.captions)
        captions_examples(captions, sources, args.captions)  # the same checks as training's
        written.append(write_parquet(args.out / f"{Path(args.captions).stem}.parquet",
                                     to_examples(captions, args.norm, Path(args.captions).stem)))
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    try:
        main()
    except DataError as error:
        print(f"python -m training.to_parquet: data error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
