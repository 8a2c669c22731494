"""Triton's own statistics per model, as deltas over one load level."""

from __future__ import annotations

from embcap.contract import DECODER, ENSEMBLE, PROJECTOR, Param


def served_candidates(grpc_url: str) -> int:
    """Candidates per row the running decoder writes (its config's parameter, as the export set it)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        config = client.get_model_config(DECODER).config
        return int(config.parameters[Param.CANDIDATES].string_value or 1)
    finally:
        client.close()


def snapshot(grpc_url: str, models=(ENSEMBLE, PROJECTOR, DECODER)) -> dict[str, dict[str, float]]:
    """Triton's cumulative statistics of each of `models` now."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        out = {}
        for name in models:
            stats = client.get_inference_statistics(name).model_stats[0]
            infer = stats.inference_stats
            out[name] = {
                "requests": infer.success.count,
                "executions": stats.execution_count,
                "inferences": stats.inference_count,  # rows
                "queue_ns": infer.queue.ns,
                "success_ns": infer.success.ns,  # whole request inside Triton
                "compute_infer_ns": infer.compute_infer.ns,
                "compute_input_ns": infer.compute_input.ns,
                "compute_output_ns": infer.compute_output.ns,
                "failures": infer.fail.count,
                "batches": {int(b.batch_size): int(b.compute_infer.count) for b in stats.batch_stats},
            }
        return out
    finally:
        client.close()


def delta(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """Per model: executions, mean rows per execution, mean queue/compute ms per request."""
    out = {}
    for name, now in after.items():
        then = before.get(name, {})
        d = {k: now[k] - then.get(k, 0) for k in now if k != "batches"}
        batches = {size: count - then.get("batches", {}).get(size, 0) for size, count in now["batches"].items()}
        requests = max(d["requests"], 1)
        executions = max(d["executions"], 1)
        out[name] = {
            "requests": d["requests"],
            "executions": d["executions"],
            "rows": d["inferences"],
            "mean_batch_rows": d["inferences"] / executions if d["executions"] else 0.0,
            "queue_ms_per_request": d["queue_ns"] / requests / 1e6,
            "server_ms_per_request": d["success_ns"] / requests / 1e6,
            # Triton adds a batch's compute time once per request in it: per request ~ per execution
            "compute_ms_per_request": (d["compute_infer_ns"] + d["compute_input_ns"] + d["compute_output_ns"])
            / requests / 1e6,
            "failures": d["failures"],
            "batch_histogram": {size: count for size, count in sorted(batches.items()) if count},
        }
    return out
