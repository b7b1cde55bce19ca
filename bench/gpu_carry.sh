#!/usr/bin/env bash
# Assemble .gpu_carry/, everything bench/gpu_run.sh needs on a GPU machine that reaches no network
# (the `device` H200/H100: Python 3.12, CUDA, torch, no Java), from the package registries (PyPI,
# Debian) and this checkout. Run it here; each piece is made once (delete it to remake it).
#
#   bench/gpu_carry.sh            make what is missing, print the sizes
#
# .gpu_carry/
#   src/llama_cpp_python-0.3.36-trim.tar.xz  llama-cpp-python's sdist without models, docs, tests and the
#                                            ggml backends other than CPU and CUDA (needed by `build` only)
#   run/wheels/*.whl                 what the GPU image lacks, for CPython 3.12: pydantic (+core, annotated-types,
#                                    typing-inspection, typing-extensions), diskcache, scikit-build-core
#   run/tspkg.tar.xz                 torchserve + torch-model-archiver 0.12.0 (pure Python), without the jar
#   run/model-server.jar.xz          TorchServe's frontend jar, packed by bench/jar_repack.py (18 MB instead of
#                                    41): rebuilt byte for byte there, since torchserve_fix checks its sha256
#   run/torchserve-fix.jar           torchserve_fix (issue #16) built here against that jar (javac 17)
#   run/jre.tar.xz                   a Java 17 runtime made by jlink from Debian's openjdk-17 (JAVA_MODULES below)
#   run/gguf-py.tar.xz               llama.cpp's gguf-py, to write the random GGUF
#   run/tokenizer.json.xz            the default model's tokenizer and chat template (bench/gpu_make_gguf.py)
#   llamawheel/part*, name.txt       (after a `build` run) the CUDA wheel that came back: copy $OUT's
#                                    llamawheel.part* and llamawheel-name.txt here (see docs/gpu.md)
#
# Environment: PYTHON (default .venv/bin/python), GPU_CARRY (default .gpu_carry), PY_VERSION (3.12, the
# GPU image's; set 3.11 to try the whole thing on this machine), JAVA_MODULES (the jlink list).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
C=${GPU_CARRY:-$ROOT/.gpu_carry}
PY=${PYTHON:-$ROOT/.venv/bin/python}
PY_VERSION=${PY_VERSION:-3.12}
LLAMA_VERSION=0.3.36
TS_VERSION=0.12.0
MODEL_SERVER_JAR_SHA256=ce340411ce54beaacd3dcfa31644a9aa369a83a36ed687172ba1088a13123dfe
# TorchServe 0.12's frontend (netty: jdk.unsupported; log4j2: java.xml, java.naming, java.management; snakeyaml:
# java.desktop's java.beans; gson: java.sql) and the fix's agent (java.instrument); checked by starting
# TorchServe with it (docs/gpu.md). Modules are left uncompressed: xz packs them to 17 MB instead of 29.
JAVA_MODULES=${JAVA_MODULES:-java.base,java.desktop,java.instrument,java.logging,java.management,java.naming,java.sql,java.xml,jdk.management,jdk.unsupported}
GGUF=$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
log() { echo "$(date +%T) == $*"; }
die() { echo "bench/gpu_carry.sh: error: $*" >&2; exit 1; }
mkdir -p "$C/src" "$C/run/wheels"

pip_download() { "$PY" -m pip download --quiet --disable-pip-version-check --no-deps "$@"; }

sdist() {
  [ -d "$T/llama_cpp_python-$LLAMA_VERSION" ] && return
  pip_download --no-binary :all: "llama-cpp-python==$LLAMA_VERSION" -d "$T/dl"
  tar -xzf "$T/dl/llama_cpp_python-$LLAMA_VERSION.tar.gz" -C "$T"
}

trimmed_sdist() {
  local out=$C/src/llama_cpp_python-$LLAMA_VERSION-trim.tar.xz
  [ -f "$out" ] && return
  log "llama-cpp-python $LLAMA_VERSION sdist, trimmed"
  sdist
  local v=$T/llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp
  # nothing a CUDA build of the library and of llama-server compiles (the UI is left out: an empty one is built)
  rm -rf "$T/llama_cpp_python-$LLAMA_VERSION"/{.git,docs,examples,tests} \
    "$v"/{models,docs,media,benches,examples,pocs,tests,ci,.devops,.github} \
    "$v/tools/ui"/{src,static,tests,package-lock.json} "$v/tools/mtmd"/{tests,test-*}
  for b in "$v"/ggml/src/ggml-*/; do
    case "$(basename "$b")" in ggml-cpu|ggml-cuda|ggml-blas) ;; *) rm -rf "$b" ;; esac
  done
  tar -C "$T" -cf - "llama_cpp_python-$LLAMA_VERSION" | xz -T0 -9 > "$out.part"
  mv "$out.part" "$out"
}

gguf_py() {
  local out=$C/run/gguf-py.tar.xz
  [ -f "$out" ] && return
  log "gguf-py"
  sdist
  tar -C "$T/llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp" -cJf "$out" gguf-py
}

wheels() {
  [ -n "$(ls "$C"/run/wheels/pydantic_core-*cp${PY_VERSION/./}* 2>/dev/null)" ] && return
  log "wheels for CPython $PY_VERSION"
  rm -f "$C"/run/wheels/*.whl
  local platforms=() p
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
  done
  # requirements.txt's pydantic at the version this checkout runs, with its needs; typing-extensions too
  # (the image's may be older than pydantic wants); diskcache for llama_cpp; scikit-build-core to build it
  local names=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
               typing-extensions==4.16.0 diskcache==5.6.3 scikit-build-core==1.1.2)
  pip_download --only-binary=:all: --python-version "$PY_VERSION" --implementation cp "${platforms[@]}" \
    -d "$C/run/wheels" "${names[@]}"
}

torchserve_pkg() {
  [ -f "$C/run/tspkg.tar.xz" ] && [ -f "$C/run/model-server.jar.xz" ] && [ -f "$C/run/torchserve-fix.jar" ] && return
  log "torchserve $TS_VERSION, its jar (packed), torchserve_fix"
  pip_download --only-binary=:all: -d "$T/ts" "torchserve==$TS_VERSION" "torch-model-archiver==$TS_VERSION"
  mkdir -p "$T/tspkg"
  for w in "$T"/ts/*.whl; do "$PY" -m zipfile -e "$w" "$T/tspkg"; done
  local jar=$T/tspkg/ts/frontend/model-server.jar
  [ "$(sha256sum "$jar" | cut -d' ' -f1)" = "$MODEL_SERVER_JAR_SHA256" ] || die "PyPI's torchserve $TS_VERSION jar is not the one torchserve_fix was written for"
  TORCHSERVE_FIX_OUT=$T/fix PYTHON=$PY torchserve_fix/build.sh "$jar" >/dev/null
  cp "$T/fix/torchserve-fix.jar" "$C/run/torchserve-fix.jar"
  "$PY" bench/jar_repack.py pack "$jar" "$C/run/model-server.jar.xz"
  rm "$jar"
  tar -C "$T/tspkg" -cJf "$C/run/tspkg.tar.xz" .
}

jre() {
  [ -f "$C/run/jre.tar.xz" ] && return
  log "Java runtime (jlink, openjdk 17): $JAVA_MODULES"
  local home=/usr/lib/jvm/java-17-openjdk-amd64
  if [ ! -x "$home/bin/jlink" ] || [ ! -f "$home/jmods/java.base.jmod" ]; then
    log "no local openjdk-17 JDK with jmods: Debian's packages"
    mkdir -p "$T/deb" && (cd "$T/deb" && apt-get download openjdk-17-jdk-headless openjdk-17-jre-headless openjdk-17-jmods)
    for d in "$T"/deb/*.deb; do dpkg -x "$d" "$T/jdk"; done
    home=$T/jdk/usr/lib/jvm/java-17-openjdk-amd64
  fi
  "$home/bin/jlink" --module-path "$home/jmods" --add-modules "$JAVA_MODULES" --strip-debug --no-man-pages \
    --no-header-files --compress=0 --output "$T/jre"
  "$T/jre/bin/java" -version 2>&1 | head -1
  tar -C "$T" -cf - jre | xz -T0 -9 > "$C/run/jre.tar.xz.part"
  mv "$C/run/jre.tar.xz.part" "$C/run/jre.tar.xz"
}

tokenizer() {
  [ -f "$C/run/tokenizer.json.xz" ] && return
  log "tokenizer of $(basename "$GGUF")"
  [ -f "$GGUF" ] || die "$GGUF is missing (./package_llama.sh fetches it)"
  sdist
  "$PY" bench/gpu_make_gguf.py --gguf-py "$T/llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp/gguf-py" \
    --extract-tokenizer "$GGUF" --out "$C/run/tokenizer.json.xz"
}

trimmed_sdist
gguf_py
wheels
torchserve_pkg
jre
tokenizer
du -ab "$C" | sort -k2 | awk '{printf "%8.1f MiB  %s\n", $1 / 1048576, $2}'
