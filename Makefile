# `make demo` and `make test` each work on a fresh machine: they build .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel of torch lies on disk on our machines; a bare `torch` would pull CUDA builds.
TORCH := torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

# Real data for the forgetting benchmark (Debian packages): Fashion-MNIST, WordNet, and
# espeak-ng, which speaks WordNet's sentences for the Whisper track.
DATA := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz /usr/share/wordnet/data.noun \
	/usr/bin/espeak-ng
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint format bench data clean mutate

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev,bench]"
	touch $@

$(DATA):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq --no-install-recommends dataset-fashion-mnist wordnet-base espeak-ng

data: $(DATA)

demo: $(BIN)/.installed $(DATA)
	$(BIN)/dowser demo --out demo-out --overwrite

test: $(BIN)/.installed $(DATA)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

bench: $(BIN)/.installed $(DATA)
	$(BIN)/python bench/probe.py
	$(BIN)/dowser bench forgetting --out bench/results/forgetting --resume

# Mutation testing of the math modules (hours on 2 cores; never part of `make test`):
# writes bench/results/mutation.json and .md, and fails if more mutants survive than committed.
mutate: $(BIN)/.installed
	$(BIN)/python bench/mutate.py

clean:
	rm -rf $(VENV) demo-out
