# Benchmarks (bench/): `make bench` (full) and `make bench-quick`; both end with the engines side by side. At the shipped
# best-of-16 on a busy 2-vCPU machine: ~50 and ~27 min (bench/RESULTS.md).
# Included by the Makefile; results go to bench/results/<utc time>-<mode>/.
BENCH_ARGS ?=
BENCH_CHECKPOINT ?= $(CHECKPOINT)

.PHONY: bench bench-quick bench-tools

$(EMBCAP_CACHE_DIR)/perf_analyzer/bin/perf_analyzer: | setup
	$(PY) -m bench fetch-perf-analyzer

bench-tools: setup $(EMBCAP_CACHE_DIR)/perf_analyzer/bin/perf_analyzer  ## perf_analyzer from the tritonclient 2.48 wheel (not installed)

bench: bench-tools  ## full benchmark: ours vs naive baseline vs offline limit (report in bench/results/)
	$(PY) -m bench run --mode full --checkpoint $(BENCH_CHECKPOINT) $(BENCH_ARGS)

bench-quick: bench-tools  ## quick benchmark (fewer levels and requests)
	$(PY) -m bench run --mode quick --checkpoint $(BENCH_CHECKPOINT) $(BENCH_ARGS)
