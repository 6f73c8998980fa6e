# make demo: train a tiny LongNet on the stdlib corpus in two stages (~6 min on 2 cores), then
# eval.py; make test: the fast CPU test suite; make lint: ruff; make bench: the attention benchmark.
# The virtual environment is made on first use and refreshed when the dependency files change.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint format bench bench-quick bench-documents documents gpu-check context-parallel context-parallel-balance long-sequence decode bpb longrange table2 ablate throughput report clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) train.py configs/experiment/demo.yaml configs/experiment/demo_stage.yaml
	$(PY) train.py configs/experiment/demo.yaml init_from=runs/demo_stage/checkpoints/last.ckpt
	$(PY) eval.py configs/experiment/demo_eval.yaml
	@echo "demo outputs: runs/demo_stage (first stage), runs/demo (checkpoints/, logs/, config.yaml, tokenizer.json, eval/)"

test: $(STAMP)
	$(PY) -m pytest -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) -m experiments.bench.attention_scaling

bench-quick: $(STAMP)
	$(PY) -m experiments.bench.attention_scaling --quick

# document masks vs the same packed windows unmasked, 32K-256K (~25 min on 2 quiet cores)
bench-documents: $(STAMP)
	$(PY) -m experiments.bench.documents

# the tiny LongNet with and without document masks: two one-thread processes (~15 min), the table
DOCUMENTS = $(PY) -m experiments.studies.document_mask
documents: $(STAMP)
	$(DOCUMENTS) --threads 1 --shard 0/2 & a=$$!; \
	$(DOCUMENTS) --threads 1 --shard 1/2; b=$$?; \
	wait $$a && test $$b = 0 && $(DOCUMENTS)

# On a CUDA machine (~8 min): GPU tests, attention benchmark 32K-1M, 200 steps of longnet_base
# at 32K tokens; writes runs/gpu-check/report.md. Uses .venv when made, else the machine's
# python3 as it is (no install: GPU machines often have their own torch). Refuses without CUDA.
GPU_PY = $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	$(GPU_PY) -m experiments.tools.gpu_check

# the studies of experiments/README.md (resumable: a second call skips finished runs)
# the paper's Table 2 at CPU scale with the copying recipe: two one-thread processes, then the table
table2: $(STAMP)
	$(PY) -m experiments.studies.paper_table2 --threads 1 --shard 0/2 & a=$$!; \
	$(PY) -m experiments.studies.paper_table2 --threads 1 --shard 1/2; b=$$?; \
	wait $$a && test $$b = 0 && $(PY) -m experiments.studies.paper_table2

# the dilation ablation with the copying recipe: two one-thread processes, then the table
ABLATE = $(PY) -m experiments.studies.ablate_dilation --config configs/study/ablate_dilation_recipe.yaml
ablate: $(STAMP)
	$(ABLATE) --threads 1 --shard 0/2 & a=$$!; \
	$(ABLATE) --threads 1 --shard 1/2; b=$$?; \
	wait $$a && test $$b = 0 && $(ABLATE)

throughput: $(STAMP)
	$(PY) -m experiments.bench.throughput

# per-rank work of both context-parallel layouts at P = 2, 4, 8, and the overlap (~10 min on 2 cores)
context-parallel-balance: $(STAMP)
	$(PY) -m experiments.bench.context_parallel_balance

# context-parallel dilated attention on 1, 2, 4 gloo processes (~25 min on 2 cores)
context-parallel: $(STAMP)
	$(PY) -m experiments.bench.context_parallel

# recall by distance per attention: two one-thread processes, then the table of all (#14;
# 53 min measured with the runs split by hand)
longrange: $(STAMP)
	$(PY) -m experiments.studies.long_range --threads 1 --shard 0/2 & a=$$!; \
	$(PY) -m experiments.studies.long_range --threads 1 --shard 1/2; b=$$?; \
	wait $$a && test $$b = 0 && $(PY) -m experiments.studies.long_range

# one training step of the tiny LongNet at 32K-1M tokens, memory savers off and on (#13)
long-sequence: $(STAMP)
	$(PY) -m experiments.bench.long_sequence

# decoding cost against context, tiny LongNet (fixed and stretched last segment) against the
# tiny dense Transformer, batch 1: prefill s, decode tokens/s, cache MiB at 1K-64K (#25)
decode: $(STAMP)
	$(PY) -m experiments.bench.decode

# bits per byte against context (128-8192) of the demo and Table 2 models on the stdlib test
# split and the King James Bible (apt-get install -y bible-kjv), disjoint and strided (#27)
bpb: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m experiments.studies.bpb

# every results table of README.md and experiments/README.md, from experiments/results/
# (`python -m experiments.report --check` says what differs; tests/test_report.py runs it)
report: $(STAMP)
	$(PY) -m experiments.report

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
