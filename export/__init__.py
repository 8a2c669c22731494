"""Turn a caption checkpoint into a Triton model repository."""

EXPORT_FAILED = "export failed: "  # how `python -m export` starts every refusal (server.py shows it once)
