"""Turn a caption checkpoint into a Triton model repository."""
