# Quickstart: `make demo` and `make test` work on a fresh machine (they set up .venv first).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-all test-keras bench bench-quick clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: 2.13.0 is the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]' transformers==5.24.0
	# The keras-hub and mlx-vlm candidates' tests run here too, on their light installs (~80 MB each): keras-hub
	# declares tensorflow-text (~2.3 GB with tensorflow) and mlx-vlm a training stack, which neither imports on
	# this path (see test-keras; pip cannot leave a dependency out of an extra).
	$(BIN)/pip install -q 'keras>=3.15,<4' 'sentencepiece>=0.2' 'mlx[cpu]>=0.32,<0.33' requests jinja2
	$(BIN)/pip install -q --no-deps 'keras-hub>=0.32,<0.33' 'mlx-vlm==0.7.10'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/pgconv verify

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

# The keras-hub candidate's tests (tests/test_keras_hub.py skip without keras-hub). keras-hub declares
# tensorflow-text (which pulls tensorflow, ~2.3 GB) on Linux, but its torch-backend PaliGemma and transformers
# converter never import it: keras + sentencepiece, then keras-hub without its declared dependencies (~80 MB).
test-keras: $(STAMP)
	$(BIN)/pip install -q 'keras>=3.15,<4' 'sentencepiece>=0.2'
	$(BIN)/pip install -q --no-deps 'keras-hub>=0.32,<0.33'
	$(BIN)/python -m pytest -q -m keras tests/test_keras_hub.py

bench: $(STAMP)
	$(BIN)/python -m benchmarks

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
