#!/usr/bin/env bash
# Driver for the GPU benchmark on a bare CUDA machine without network (the `device` H100).
#
#   bench/gpu_run.sh build   set up, build llama-cpp-python with CUDA from the carried sdist,
#                            check the whole pipeline on a tiny random model, return the wheel
#   bench/gpu_run.sh bench   set up (reusing a build or a carried wheel), make the 8B-class
#                            Q4_0 GGUF, run bench/gpu_bench.py at 1, 8, 32 and 64 streams
#   bench/gpu_run.sh all     both
#
# Everything it needs travels in .gpu_carry/ (ignored by git; see docs/gpu.md):
#   llama_cpp_python-0.3.36-trim.tar.xz  the sdist without models/docs/other ggml backends
#   wheels/*.whl                          pydantic(+core, annotated-types, typing-inspection),
#                                         diskcache, scikit-build-core (for Python 3.12)
#   tspkg.tar.xz                          torchserve + torch-model-archiver 0.12.0 (pure Python),
#                                         without the frontend jar
#   jar.tar.xz                            TorchServe's model-server.jar, unpacked (re-zipped here)
#   jrt25c.tar.xz                         a jlink'ed Java runtime, used only when no Java 17+ exists
#   tokenizer.json.xz                     SmolLM2's tokenizer metadata, for the random GGUF
#   llamawheel/                           (optional) a CUDA wheel returned by an earlier build
# Results go to $OUT (or /tmp/gpu/out).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
C=${GPU_CARRY:-$ROOT/.gpu_carry}
W=${GPU_WORK:-/tmp/gpu}
OUT=${OUT:-$W/out}
MODE=${1:-all}
STREAMS=${STREAMS:-1,8,32,64}
BUDGETS=${BUDGETS:-25,100}
MAX_TOKENS=${MAX_TOKENS:-256}
SITE=$W/site
mkdir -p "$W" "$OUT" "$SITE/bin"
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
export PATH=$SITE/bin:$PATH PYTHONUNBUFFERED=1
log() { echo "$(date +%T) == $*"; }
die() { echo "$(date +%T) !! $*"; exit 1; }

probe() {
  log probe
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  echo "python: $(command -v python3) $(python3 --version 2>&1); nvcc: $(nvcc --version 2>/dev/null | tail -1)"
  echo "java: $(java -version 2>&1 | head -1 || echo none)"
  python3 -m pip list 2>/dev/null | grep -iE '^(torch|numpy|jinja2|pydantic|diskcache|scikit.build.core|psutil|packaging|pillow|requests|pyyaml|typing.extensions|cmake|ninja) ' | tr -s ' ' | paste -sd ';'
  echo "cores $(nproc); $(free -g | awk '/Mem/{print "RAM " $2 " GiB"}'); /tmp: $(df -h /tmp | tail -1 | awk '{print $4 " free"}')"
}

setup() {
  if [ ! -f "$W/setup.done" ]; then
    log "setup: Python packages, TorchServe, Java"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$C"/wheels/*.whl || die "pip install of the carried wheels failed"
    tar -xJf "$C/tspkg.tar.xz" -C "$SITE"
    mkdir -p "$W/jar" && tar -xJf "$C/jar.tar.xz" -C "$W/jar"
    python3 - "$W/jar" "$SITE/ts/frontend/model-server.jar" <<'PY' || die "could not re-zip model-server.jar"
import os, sys, zipfile
src, dst = sys.argv[1:]
with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as z:
    z.write(os.path.join(src, "META-INF/MANIFEST.MF"), "META-INF/MANIFEST.MF")
    for d, dirs, files in os.walk(src):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(d, f)
            arc = os.path.relpath(p, src)
            if arc != "META-INF/MANIFEST.MF":
                z.write(p, arc)
PY
    printf '#!/usr/bin/env python3\nimport sys\nfrom ts.model_server import start\nsys.exit(start())\n' > "$SITE/bin/torchserve"
    printf '#!/usr/bin/env python3\nimport sys\nfrom model_archiver.model_packaging import generate_model_archive\nsys.exit(generate_model_archive())\n' > "$SITE/bin/torch-model-archiver"
    chmod +x "$SITE/bin/"*
    if ! java -version 2>&1 | grep -qE 'version "(1[7-9]|2[0-9])'; then
      log "no Java 17+ here: unpacking the carried runtime"
      tar -xJf "$C/jrt25c.tar.xz" -C "$W"
    fi
    touch "$W/setup.done"
  fi
  if [ -x "$W/jrt25c/bin/java" ]; then export JAVA_HOME=$W/jrt25c PATH=$W/jrt25c/bin:$PATH; fi
  java -version 2>&1 | head -1
}

build() {
  mkdir -p "$W/wheel"
  if ls "$W"/wheel/llama_cpp_python-*.whl >/dev/null 2>&1; then
    log "llama-cpp-python: reusing $(ls "$W"/wheel/*.whl)"
  elif ls "$C"/llamawheel/part* >/dev/null 2>&1; then
    log "llama-cpp-python: carried CUDA wheel"
    cat "$C"/llamawheel/part* > "$W/wheel/$(cat "$C/llamawheel/name.txt")"
  else
    log "llama-cpp-python: building with CUDA from the sdist"
    mkdir -p "$W/src" && tar -xJf "$C/llama_cpp_python-0.3.36-trim.tar.xz" -C "$W/src"
    local t0=$SECONDS
    NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"  # as setup.sh: AMX kernels crash on AMX Xeons
    CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_C_FLAGS='$NO_AMX' -DCMAKE_CXX_FLAGS='$NO_AMX'" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
      python3 -m pip wheel -q --no-build-isolation --no-deps --no-index -w "$W/wheel" \
      "$W/src/llama_cpp_python-0.3.36" > "$W/build.log" 2>&1 || { tail -40 "$W/build.log"; die "build failed"; }
    log "built in $((SECONDS - t0)) s: $(ls -la "$W"/wheel/*.whl)"
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$W"/wheel/llama_cpp_python-*.whl || die "pip install of the llama-cpp-python wheel failed"
  python3 -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, 'GPU offload:', bool(llama_cpp.llama_supports_gpu_offload()))"
}

return_wheel() {
  local whl; whl=$(ls "$W"/wheel/llama_cpp_python-*.whl | head -1)
  basename "$whl" > "$OUT/llamawheel-name.txt"
  split -b 15M -d "$whl" "$OUT/llamawheel.part"
  ls -la "$OUT"
}

# The image's torch is a CUDA build (cu130, its own cuBLAS/cudart); TorchServe's worker imports it
# before the handler loads llama.cpp, and llama.cpp's CUDA backend then segfaults at model load.
# Preloading libggml-cuda.so fixes the worker but kills the JVM, so a sitecustomize re-executes
# only TorchServe's Python workers with LD_PRELOAD. (A CPU-only torch, as requirements.txt pins,
# does not need this.)
worker_preload() {
  mkdir -p "$W/preload"
  cat > "$W/preload/sitecustomize.py" <<'PY'
import os, sys
_lib = os.environ.get("GPU_BENCH_WORKER_PRELOAD")
if _lib and os.environ.get("LD_PRELOAD") != _lib:
    with open("/proc/self/cmdline", "rb") as _f:
        _argv = [a.decode() for a in _f.read().split(b"\0") if a]
    if any(a.endswith("model_service_worker.py") for a in _argv):
        os.environ["LD_PRELOAD"] = _lib
        os.execv(sys.executable, [sys.executable] + _argv[1:])
PY
  export PYTHONPATH=$W/preload:$PYTHONPATH GPU_BENCH_WORKER_PRELOAD=$SITE/llama_cpp/lib/libggml-cuda.so
}

GGUF_PY=$W/src/llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py
gguf_py() {
  [ -d "$GGUF_PY" ] || { mkdir -p "$W/src" && tar -xJf "$C/llama_cpp_python-0.3.36-trim.tar.xz" -C "$W/src" \
    llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py; }
}

tiny_check() {
  gguf_py
  log "pipeline check on a tiny random model"
  python3 bench/gpu_make_gguf.py --gguf-py "$GGUF_PY" --tokenizer "$C/tokenizer.json.xz" --tiny \
    --out "$W/tiny.Q4_0.gguf" 2>&1 | grep -vE '^\[ *[0-9]+/' | tail -5
  python3 bench/gpu_bench.py --gguf "$W/tiny.Q4_0.gguf" --streams 1,8 --max-tokens 32 --n-ctx 512 \
    --step-budget-ms 25 --out "$W/tiny" 2>&1 | tail -25
  cp "$W/tiny/table.md" "$OUT/tiny-table.md" 2>/dev/null
  cat "$W"/tiny/*.tail 2>/dev/null | grep -iE 'cuda|gpu|offload|error|loading' | tail -15
}

bench() {
  gguf_py
  local gguf=$W/model/llama8b-random.Q4_0.gguf
  mkdir -p "$W/model"
  if [ ! -f "$gguf" ]; then
    log "making the 8B-class random GGUF"
    python3 bench/gpu_make_gguf.py --gguf-py "$GGUF_PY" --tokenizer "$C/tokenizer.json.xz" --out "$gguf" \
      2>&1 | grep -vE '^\[ *[0-9]+/|^llama_model_loader|^llm_load' | tail -8
  fi
  [ -f "$gguf" ] || die "no GGUF"
  log "benchmark: streams $STREAMS, max_tokens $MAX_TOKENS, step budgets $BUDGETS ms"
  python3 bench/gpu_bench.py --gguf "$gguf" --streams "$STREAMS" --max-tokens "$MAX_TOKENS" \
    --step-budget-ms "$BUDGETS" --out "$W/results" 2>&1 | grep -vE '^llama_|^load|^print_info|^ggml_' | tee "$W/bench.log"
  cp "$W/results/table.md" "$W/results/results.json" "$OUT/" 2>/dev/null
  cp "$W/bench.log" "$OUT/bench.log"
  for f in "$W"/results/*.tail; do [ -f "$f" ] && cp "$f" "$OUT/"; done
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv,noheader
}

probe
setup
worker_preload
case "$MODE" in
  build) build; tiny_check; return_wheel ;;
  bench) build; bench ;;
  all) build; tiny_check; bench ;;
  *) die "mode: build | bench | all" ;;
esac
log done
