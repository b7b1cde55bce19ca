#!/usr/bin/env bash
# Driver for the GPU benchmark on a bare CUDA machine without network (the `device` H200/H100).
#
#   bench/gpu_run.sh build   set up, build llama-cpp-python and llama-server with CUDA (sm_90 only) from the
#                            carried sdist, write the 8B-class random GGUF, check the pipeline on a tiny
#                            model, and return the build in $OUT/llamapkg/ (copy that folder to
#                            .gpu_carry/llamapkg to skip the build next time)
#   bench/gpu_run.sh bench   set up (reusing this machine's build or the carried wheel), make the GGUF if
#                            missing, run bench/gpu_bench.py; results in $OUT (table.md, results.json,
#                            logs.txt, gpu.txt: 4 files, no folders)
#   bench/gpu_run.sh all     build and bench (no tiny check); the build comes back if the files fit
#   bench/gpu_run.sh raw     the raw-engine rows only (no TorchServe, no Java, no llama-server), from a carried
#                            build: needs only .gpu_carry/llamapkg and, of run/, wheels/, gguf-py.tar.xz and
#                            tokenizer.json.xz (about 28 MiB; the quickest rerun of the sampling rows)
#
# Everything it needs travels in .gpu_carry/, which bench/gpu_carry.sh assembles on a machine with network
# (see its header and docs/gpu.md). Settings (environment): STREAMS (1,8,32), SAMPLING (greedy,sampled),
# VARIANTS (backend-topk: raw-engine rows with llama.cpp's backend top-k), BUDGETS (100: ms per handler
# call, one TorchServe model each), WORKERS (1; 1,2 adds two workers sharing the GPU at WORKER_STREAMS
# 32,64), MAX_TOKENS (256), LLAMA_SERVER (1: the llama-server columns), CUDA_ARCH (90-real), DEADLINE_S
# (0; else gpu_bench.py starts no server part after that many seconds), MODEL (8b; tiny: a dress rehearsal),
# CARRIED_JAVA (1: use the carried Java runtime even where a Java 17+ exists), SERVED_THREADS (0: the handler's
# n_threads, cores / workers; a comma list adds one TorchServe model per further value), SERVED_VARIANTS (none;
# e.g. 'cache_answers=false;n_batch=1024': one more TorchServe model per variant, handler keys changed).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
C=${GPU_CARRY:-$ROOT/.gpu_carry}
W=${GPU_WORK:-/tmp/gpu}
OUT=${OUT:-$W/out}
MODE=${1:-all}
STREAMS=${STREAMS:-1,8,32}
SAMPLING=${SAMPLING:-greedy,sampled}
VARIANTS=${VARIANTS:-backend-topk}
BUDGETS=${BUDGETS:-100}
WORKERS=${WORKERS:-1}
WORKER_STREAMS=${WORKER_STREAMS:-32,64}
MAX_TOKENS=${MAX_TOKENS:-256}
LLAMA_SERVER=${LLAMA_SERVER:-1}
CUDA_ARCH=${CUDA_ARCH:-90-real}
DEADLINE_S=${DEADLINE_S:-0}
SERVED_THREADS=${SERVED_THREADS:-0}
SERVED_VARIANTS=${SERVED_VARIANTS:-}
LLAMA_VERSION=0.3.36
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
  echo "cores $(nproc); $(free -g | awk '/Mem/{print "RAM " $2 " GiB"}'); /tmp: $(df -h /tmp | tail -1 | awk '{print $4 " free"}')"
}

setup_python() {
  [ -f "$W/python.done" ] && return
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$C"/run/wheels/*.whl || die "pip install of the carried wheels failed"
  touch "$W/python.done"
}

setup() {
  if [ ! -f "$W/setup.done" ]; then
    log "setup: Python packages, TorchServe (its jar rebuilt byte for byte), torchserve_fix, Java"
    setup_python
    tar -xJf "$C/run/tspkg.tar.xz" -C "$SITE" || die "no $C/run/tspkg.tar.xz"
    python3 bench/jar_repack.py unpack "$C/run/model-server.jar.xz" "$SITE/ts/frontend/model-server.jar" \
      || die "could not rebuild model-server.jar"
    printf '#!/usr/bin/env python3\nimport sys\nfrom ts.model_server import start\nsys.exit(start())\n' > "$SITE/bin/torchserve"
    printf '#!/usr/bin/env python3\nimport sys\nfrom model_archiver.model_packaging import generate_model_archive\nsys.exit(generate_model_archive())\n' > "$SITE/bin/torch-model-archiver"
    chmod +x "$SITE/bin/"*
    # the fix of issue #16, built on the carrying machine against the same jar (chatstack loads it from here)
    mkdir -p torchserve_fix/build && cp "$C/run/torchserve-fix.jar" torchserve_fix/build/torchserve-fix.jar
    if [ -n "${CARRIED_JAVA:-}" ] || ! java -version 2>&1 | grep -qE 'version "(1[7-9]|2[0-9])'; then
      log "no Java 17+ here: unpacking the carried runtime"
      tar -xJf "$C/run/jre.tar.xz" -C "$W" || die "no Java and no $C/run/jre.tar.xz"
    fi
    touch "$W/setup.done"
  fi
  if [ -x "$W/jre/bin/java" ]; then export JAVA_HOME=$W/jre PATH=$W/jre/bin:$PATH; fi
  java -version 2>&1 | head -1
}

build() {
  mkdir -p "$W/wheel"
  if ls "$W"/wheel/llama_cpp_python-*.whl >/dev/null 2>&1; then
    log "llama-cpp-python: reusing $(ls "$W"/wheel/*.whl)"
  elif ls "$C"/llamapkg/part.* >/dev/null 2>&1; then
    log "llama-cpp-python: the carried CUDA build (llamapkg)"
    cat "$C"/llamapkg/part.* | tar -xJf - -C "$W" || die "could not unpack $C/llamapkg"
    rm -rf "$SITE/llama_cpp" && mv "$W/pkg/llama_cpp" "$SITE/" && [ -d "$W/pkg/lsrv" ] && mv "$W/pkg/lsrv" "$W/"
  else
    log "llama-cpp-python and llama-server: building with CUDA ($CUDA_ARCH) from the sdist"
    mkdir -p "$W/src" && tar -xJf "$C/src/llama_cpp_python-$LLAMA_VERSION-trim.tar.xz" -C "$W/src" \
      || die "no sdist in $C/src"
    local t0=$SECONDS
    NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"  # as setup.sh: AMX kernels crash on AMX Xeons
    # the build folder is kept: llama-server is built in it next, from the same configuration
    CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH -DCMAKE_C_FLAGS='$NO_AMX' -DCMAKE_CXX_FLAGS='$NO_AMX'" \
      CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
      python3 -m pip wheel -q --no-build-isolation --no-deps --no-index -w "$W/wheel" \
      -C build-dir="$W/llbuild" "$W/src/llama_cpp_python-$LLAMA_VERSION" > "$W/build.log" 2>&1 \
      || { tail -40 "$W/build.log"; die "build failed"; }
    log "wheel built in $((SECONDS - t0)) s: $(ls -la "$W"/wheel/*.whl)"
    if [ "$LLAMA_SERVER" = 1 ]; then
      t0=$SECONDS
      # LLAVA_BUILD=OFF: with the tools on, llama.cpp adds tools/mtmd itself (twice is a CMake error)
      { cmake -S "$W/src/llama_cpp_python-$LLAMA_VERSION" -B "$W/llbuild" -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
          -DLLAVA_BUILD=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
        && timeout "${SERVER_BUILD_S:-200}" cmake --build "$W/llbuild" --target llama-server -j "$(nproc)"; } >> "$W/build.log" 2>&1 \
        && server_dir \
        && log "llama-server built in $((SECONDS - t0)) s" \
        || { grep -E "error|Error" "$W/build.log" | tail -8; log "llama-server build failed: no llama-server columns"; }
    fi
  fi
  if ls "$W"/wheel/llama_cpp_python-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$W"/wheel/llama_cpp_python-*.whl || die "pip install of the llama-cpp-python wheel failed"
  fi
  python3 -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, 'GPU offload:', bool(llama_cpp.llama_supports_gpu_offload()))"
  # llama-server uses the wheel's libllama/libggml (the same build), and its own libllama-common
  if [ -x "$W/lsrv/llama-server" ]; then
    printf '#!/bin/sh\nLD_LIBRARY_PATH=%s/lsrv:%s/llama_cpp/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} exec %s/lsrv/llama-server "$@"\n' \
      "$W" "$SITE" "$W" > "$SITE/bin/llama-server-run" && chmod +x "$SITE/bin/llama-server-run"
    "$SITE/bin/llama-server-run" --version 2>&1 | tail -2
  fi
}

server_dir() {   # $W/lsrv: llama-server and the shared libraries of its build that the wheel does not hold
  mkdir -p "$W/lsrv"
  cp "$(find "$W/llbuild" -name llama-server -type f -perm -u+x | head -1)" "$W/lsrv/llama-server" || return 1
  local lib
  for lib in $(find "$W/llbuild" -name 'lib*.so*' \( -type f -o -type l \)); do
    case "$(basename "$lib")" in libllama.so*|libggml*|libmtmd*) ;; *) cp -P "$lib" "$W/lsrv/" ;; esac
  done
}

return_package() {
  # $OUT/llamapkg/part.NN = what .gpu_carry/llamapkg/ must hold: the installed llama_cpp package and llama-server
  # with its libraries, xz'd, in 15 MiB parts (files over 16 MiB do not come back). Not the wheel: its build
  # installs every library twice and pip keeps the .so/.so.0/.so.0.x names as three copies (151 MB for sm_90);
  # here each library is stored once and its other names are links. At most 8 files come back in all.
  rm -rf "$W/pkg" && mkdir -p "$W/pkg" && cp -a "$SITE/llama_cpp" "$W/pkg/" && { [ -d "$W/lsrv" ] && cp -a "$W/lsrv" "$W/pkg/"; }
  python3 - "$W/pkg" <<'PY'
import hashlib, os, sys
seen = {}
for d, _, files in os.walk(sys.argv[1]):
    for f in sorted(files, key=len, reverse=True):     # the longest name (libx.so.0.25.3) stays a file
        p = os.path.join(d, f)
        if os.path.islink(p) or not f.startswith("lib"):
            continue
        key = (d, os.path.getsize(p), hashlib.sha1(open(p, "rb").read()).hexdigest())
        if key in seen:
            os.remove(p)
            os.symlink(os.path.basename(seen[key]), p)
        else:
            seen[key] = p
PY
  find "$W/pkg" -name __pycache__ -prune -exec rm -rf {} +
  mkdir -p "$W/pkgout" && rm -f "$W"/pkgout/*
  tar -C "$W" -cf - pkg | xz -T0 -6 | split -b 15M -d - "$W/pkgout/part."
  local have parts
  have=$(find "$OUT" -type f | wc -l); parts=$(ls "$W"/pkgout | wc -l)
  if [ $((have + parts)) -le 8 ]; then
    mkdir -p "$OUT/llamapkg" && cp "$W"/pkgout/part.* "$OUT/llamapkg/"
    log "llamapkg: $parts part(s) in \$OUT/llamapkg ($(du -sh "$W/pkgout" | cut -f1))"
  else
    log "llamapkg: $parts part(s) ($(du -sh "$W/pkgout" | cut -f1)) do not fit beside $have files in \$OUT: not returned"
  fi
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

GGUF_PY=$W/gguf-py
gguf_py() { [ -d "$GGUF_PY" ] || tar -xJf "$C/run/gguf-py.tar.xz" -C "$W" || die "no $C/run/gguf-py.tar.xz"; }

# MODEL=tiny: the 2-layer model everywhere (a dress rehearsal of the whole script on any machine)
if [ "${MODEL:-8b}" = tiny ]; then GGUF=$W/model/tiny-random.Q4_0.gguf TINY=--tiny; else GGUF=$W/model/llama8b-random.Q4_0.gguf TINY=; fi
write_f16() {   # the random F16 weights (no llama.cpp needed: runs during the build)
  gguf_py
  mkdir -p "$W/model"
  [ -f "$GGUF" ] || [ -f "$GGUF.f16.gguf" ] || python3 bench/gpu_make_gguf.py --gguf-py "$GGUF_PY" \
    --tokenizer "$C/run/tokenizer.json.xz" $TINY --quant F16 --out "$GGUF.f16.gguf" 2>&1 | tail -2
}

make_gguf() {
  gguf_py
  mkdir -p "$W/model"
  if [ ! -f "$GGUF" ]; then
    [ -f "$GGUF.f16.gguf" ] || write_f16
    log "quantizing the 8B-class random GGUF to Q4_0"
    python3 -c "import sys; sys.path.insert(0, 'bench'); import gpu_make_gguf as g; g.quantize(sys.argv[1], sys.argv[2], 'Q4_0')" \
      "$GGUF.f16.gguf" "$GGUF" 2>&1 | grep -vE '^\[ *[0-9]+/|^llama_model_loader|^llm_load' | tail -3
    rm -f "$GGUF.f16.gguf"
  fi
  [ -f "$GGUF" ] || die "no GGUF"
}

tiny_check() {
  gguf_py
  log "pipeline check on a tiny random model (raw, TorchServe, llama-server; greedy and sampled)"
  python3 bench/gpu_make_gguf.py --gguf-py "$GGUF_PY" --tokenizer "$C/run/tokenizer.json.xz" --tiny \
    --out "$W/tiny.Q4_0.gguf" 2>&1 | grep -vE '^\[ *[0-9]+/' | tail -2
  timeout "${TINY_CHECK_S:-240}" python3 bench/gpu_bench.py --gguf "$W/tiny.Q4_0.gguf" --streams 8 --max-tokens 32 --n-ctx 512 \
    --variants backend-topk,backend-chain --step-budget-ms 25 ${LLAMA_SERVER_BIN:+--llama-server "$LLAMA_SERVER_BIN"} \
    --out "$W/tiny" 2>&1 | grep -vE '^llama_|^load|^print_info|^ggml_' | tail -30
  grep -iE 'error|Traceback' "$W"/tiny/logs.txt 2>/dev/null | tail -5
}

bench() {
  make_gguf
  log "benchmark: streams $STREAMS, sampling $SAMPLING, variants $VARIANTS, max_tokens $MAX_TOKENS, step budgets $BUDGETS ms, workers $WORKERS"
  python3 bench/gpu_bench.py --gguf "$GGUF" --streams "$STREAMS" --sampling "$SAMPLING" --variants "$VARIANTS" \
    --max-tokens "$MAX_TOKENS" --step-budget-ms "$BUDGETS" --workers "$WORKERS" --worker-streams "$WORKER_STREAMS" \
    --served-threads "$SERVED_THREADS" --served-variants "$SERVED_VARIANTS" ${LLAMA_SERVER_BIN:+--llama-server "$LLAMA_SERVER_BIN"} ${SKIP_SERVED:+--skip-served} --deadline-s "$DEADLINE_S" --out "$W/results" 2>&1 \
    | grep -vE '^llama_|^load|^print_info|^ggml_' | tee "$W/bench.log"
  cat "$W/bench.log" >> "$W/results/logs.txt"
  cp "$W/results/table.md" "$W/results/results.json" "$W/results/logs.txt" "$OUT/" 2>/dev/null
  { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv
    nproc; python3 --version; } > "$OUT/gpu.txt" 2>&1
}

probe
if [ "$MODE" = raw ]; then setup_python; else setup; worker_preload; fi
case "$MODE" in
  raw)
    build
    SKIP_SERVED=1 LLAMA_SERVER_BIN= bench ;;
  build)   # the GGUF is written while llama.cpp compiles and quantized while the tiny check runs
    write_f16 > "$W/f16.log" 2>&1 &
    f16=$!
    build
    [ -x "$SITE/bin/llama-server-run" ] && [ "$LLAMA_SERVER" = 1 ] && LLAMA_SERVER_BIN=$SITE/bin/llama-server-run
    return_package
    { while kill -0 $f16 2>/dev/null; do sleep 2; done; make_gguf; } > "$W/gguf.log" 2>&1 &
    gguf=$!
    tiny_check
    wait $gguf; cat "$W/f16.log" "$W/gguf.log"; ls -la "$W/model" ;;
  bench)
    build
    [ -x "$SITE/bin/llama-server-run" ] && [ "$LLAMA_SERVER" = 1 ] && LLAMA_SERVER_BIN=$SITE/bin/llama-server-run
    bench ;;
  all)   # build and bench in one go (no tiny check); the build comes back too if the files fit
    write_f16 > "$W/f16.log" 2>&1 &
    f16=$!
    build
    [ -x "$SITE/bin/llama-server-run" ] && [ "$LLAMA_SERVER" = 1 ] && LLAMA_SERVER_BIN=$SITE/bin/llama-server-run
    wait $f16; cat "$W/f16.log"
    bench
    return_package ;;
  *) die "mode: build | bench | all | raw" ;;
esac
log done
