# The two commands of the README: `make demo` (demo data → shards → train and evaluate three MBT variants → a table)
# and `make test`. Each does all set-up on a fresh Debian machine:
# the virtual environment .venv, the project with its DALI and dev extras, and ffmpeg (apt, when root).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DATA ?= data/demo
DEMO_SHARDS ?= shards/demo
DEMO_CLIPS ?= 64

.PHONY: setup ffmpeg test lint demo demo-data demo-shards

setup: ffmpeg $(STAMP)

$(STAMP): pyproject.toml
	@if [ ! -x "$(PY)" ]; then \
	  $(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); \
	    else echo "error: cannot create $(VENV); install python3-venv (apt-get install python3-venv) and run make again" >&2; exit 1; fi; }; \
	fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,dali]'
	@touch $@

ffmpeg:
	@if ! command -v ffmpeg >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing ffmpeg (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null; \
	  else \
	    echo "error: ffmpeg is missing; install it (as root: apt-get install -y ffmpeg) and run make again" >&2; exit 1; \
	  fi; \
	fi

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -q

demo-data: setup
	$(PY) tools/make_demo_data.py --out $(DEMO_DATA) --clips $(DEMO_CLIPS)

demo-shards: demo-data
	$(PY) tools/shard_audioset.py --segments $(DEMO_DATA)/balanced_train_segments.csv \
	  --labels $(DEMO_DATA)/class_labels_indices.csv --videos $(DEMO_DATA)/videos --out $(DEMO_SHARDS)/train --shard-size 16
	$(PY) tools/shard_audioset.py --segments $(DEMO_DATA)/eval_segments.csv \
	  --labels $(DEMO_DATA)/class_labels_indices.csv --videos $(DEMO_DATA)/videos --out $(DEMO_SHARDS)/eval --shard-size 16
	$(PY) tools/verify_shards.py $(DEMO_SHARDS)/train
	$(PY) tools/verify_shards.py $(DEMO_SHARDS)/eval

demo: demo-shards
	$(PY) -m mbt.demo --shards $(DEMO_SHARDS) --out runs/demo
