"""Core of the embedding-to-caption serving stack: checkpoint format, projector,
decoder loading and batched caption generation."""
