# Quickstart targets. `make demo` runs the main job end to end, `make test` the whole suite.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean peers peers-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The local CPU wheel; a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,lm-eval]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/dynaprune demo

test: $(STAMP)
	$(BIN)/dynaprune fetch minilm-l6
	$(BIN)/dynaprune fetch smollm2-135m
	$(BIN)/dynaprune fetch gemma3-270m  # tests/models/test_gemma3*.py skip without it
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python -m benchmarks.dense
	for b in topk encoder prefill decode blocks sparse24; do $(BIN)/python -m benchmarks.$$b || exit 1; done

# The peers (kvpress 0.5.5, transformers' QuantizedCache) in their own venv: kvpress pins transformers<5.3.
PEERS_VENV ?= .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed

$(PEERS_STAMP): benchmarks/peers/requirements.txt
	test -x $(PEERS_VENV)/bin/python || $(PY) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install -q --upgrade pip
	# torch first (the CPU wheel), so kvpress does not pull a CUDA build.
	$(PEERS_VENV)/bin/pip install -q torch==2.13.0
	$(PEERS_VENV)/bin/pip install -q -r benchmarks/peers/requirements.txt
	touch $(PEERS_STAMP)

peers-venv: $(PEERS_STAMP)

peers: $(STAMP) $(PEERS_STAMP)
	$(BIN)/python -m benchmarks.peers.export
	nice -n 5 $(PEERS_VENV)/bin/python benchmarks/peers/run_kvpress.py

clean:
	rm -rf $(VENV) $(PEERS_VENV) build *.egg-info
