"""Benchmarks: our stack (gateway -> Triton) vs a naive in-process server vs the offline limit.

`python -m bench run --mode full` (or `make bench`); results go to bench/results/.
"""
