"""Tooling shared by training, evaluation, the benchmarks and the tests: never imported by the product.

- `builders`: small checkpoints (tiny random Llama, blank-prone, starter), a tiny ONNX text tower,
  the default model's reranking settings; `python -m tooling.builders tiny|starter OUT`.
- `stats`: intervals (Welch, paired, bootstrap), ratios and verdicts, for the benchmarks and the evaluations.
- `evaluator`: an HTTP client that behaves like the competition's evaluator (health rules, requests).
"""
