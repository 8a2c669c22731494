# Training and local evaluation of the default model. Included from the Makefile ($(PY), setup, PORT, CHECKPOINT).
TRAIN_RUN ?= $(EMBCAP_CACHE_DIR)/train_run
TRAIN_ARGS ?= --steps 2000 --max-minutes 64
EVAL_URL ?= http://127.0.0.1:$(PORT)
EVAL_ARGS ?=

.PHONY: train evaluate evaluate-full

train: setup  ## train the default projector (about an hour on 2 CPU cores; resumable) and export to $(CHECKPOINT)
	@test -f /usr/share/wordnet/data.noun || { echo "WordNet missing: apt-get install wordnet-base"; exit 1; }
	nice -n 10 $(PY) -m training --run-dir $(TRAIN_RUN) --export $(CHECKPOINT) $(TRAIN_ARGS)

evaluate: setup  ## score the stack at $(EVAL_URL) on the held-out split, like the evaluator (EVAL_ARGS=...)
	$(PY) -m evaluate --url $(EVAL_URL) $(EVAL_ARGS)

evaluate-full: setup  ## as evaluate, plus the retrieval baseline (needs WordNet) and the mpnet judge if present
	$(PY) -m evaluate --url $(EVAL_URL) --baseline-corpus --also-judge mpnet $(EVAL_ARGS)
