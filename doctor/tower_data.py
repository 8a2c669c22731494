"""The `tower-data` row: with `--data PARQUET`, does the checkpoint's ImageBind text tower make that data?

The evaluator's dataset rows carry `description_embed`, the description embedded by its own tower. A
checkpoint that reranks with an imported tower (`rerank.encoder` kind `imagebind`) should reproduce them
(tooling.tower_check); if it does not, its candidates are ranked in another space than the one scored.
"""

from __future__ import annotations

from pathlib import Path

from doctor.checks import FAIL, PASS, SKIP, Options, Result

DATA_ROWS = 32  # rows embedded: enough to tell towers apart (another tower misses on every row)


def check_tower_data(options: Options) -> list[Result]:
    if options.data is None:
        return []
    from embcap.checkpoint import CheckpointError, ImageBindTowerEncoder, load_checkpoint

    try:
        checkpoint = load_checkpoint(options.repo / options.checkpoint)
    except CheckpointError as exc:
        return [Result("tower-data", SKIP, f"no checkpoint to check the data with: {str(exc).splitlines()[0]}")]
    encoder = checkpoint.spec.rerank.encoder
    if not isinstance(encoder, ImageBindTowerEncoder):
        kind = "no encoder" if encoder is None else f"a {encoder.kind} encoder"
        return [Result("tower-data", SKIP, f"{options.checkpoint} reranks with {kind}, not an imported ImageBind "
                                           "tower: nothing to compare the data's description_embed with")]
    from tooling.tower_check import agreement

    tower = checkpoint.resolve_path(encoder.path)
    data = Path(options.data)
    try:
        result = agreement(tower, data, DATA_ROWS, log=lambda _: None)
    except (OSError, ValueError) as exc:
        return [Result("tower-data", FAIL, f"{data}: {exc}")]
    return [Result("tower-data", PASS if result.exit_code == 0 else FAIL, result.summary(tower, data))]
