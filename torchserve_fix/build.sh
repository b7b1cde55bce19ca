#!/usr/bin/env bash
# Build torchserve_fix/build/torchserve-fix.jar: the fix for issue #16 (several workers on one
# continuous-batching model stall each other in TorchServe 0.12.0), compiled against the installed
# TorchServe. Does nothing when the jar is up to date.
#
#   torchserve_fix/build.sh [MODEL_SERVER_JAR]
#
# MODEL_SERVER_JAR  TorchServe's ts/frontend/model-server.jar (default: that of .venv's torchserve,
#                   else of $PYTHON's). It must be TorchServe 0.12.0's, byte for byte: the replacement
#                   class is written for it. Anything else is an error, never a silently unpatched server.
# Environment: PYTHON, TORCHSERVE_FIX_OUT (output folder, default torchserve_fix/build).
# Needs a JDK 17 (javac and jar; Debian/Ubuntu: openjdk-17-jdk-headless). The server itself needs
# only a Java runtime.
#
# What it makes: an agent jar holding src/torchservefix/Agent.java and, under
# torchserve_fix/replacements/, our org.pytorch.serve.wlm.ContinuousBatching. Java started with
# -javaagent:PATH/torchserve-fix.jar loads our class instead of model-server.jar's (see Agent.java
# for why an agent rather than the class path). chatstack.torchserve_process passes it through
# vmargs; the container image through JAVA_TOOL_OPTIONS.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${TORCHSERVE_FIX_OUT:-$HERE/build}"
TORCHSERVE_VERSION=0.12.0
MODEL_SERVER_JAR_SHA256=ce340411ce54beaacd3dcfa31644a9aa369a83a36ed687172ba1088a13123dfe
REPLACED="org/pytorch/serve/wlm/ContinuousBatching"
die() { echo "torchserve_fix/build.sh: error: $*" >&2; exit 1; }

PYTHON="${PYTHON:-$( [ -x "$HERE/../.venv/bin/python" ] && echo "$HERE/../.venv/bin/python" || command -v python3 )}"
JAR="${1:-$("$PYTHON" -c 'import importlib.util, os
spec = importlib.util.find_spec("ts")
print(os.path.join(spec.submodule_search_locations[0], "frontend", "model-server.jar") if spec else "")')}"
[ -n "$JAR" ] || die "TorchServe is not installed for $PYTHON (pip install -r requirements.txt)"
[ -f "$JAR" ] || die "$JAR does not exist (is TorchServe installed?)"
actual="$(sha256sum "$JAR" | cut -d' ' -f1)"
if [ "$actual" != "$MODEL_SERVER_JAR_SHA256" ]; then
  found="$(cat "$(dirname "$(dirname "$JAR")")/version.txt" 2>/dev/null || echo unknown)"
  die "$JAR is TorchServe $found (sha256 $actual), but this fix replaces a class of TorchServe" \
      "$TORCHSERVE_VERSION's model-server.jar (sha256 $MODEL_SERVER_JAR_SHA256). Install torchserve==$TORCHSERVE_VERSION," \
      "or port torchserve_fix/src to that version and update the hash here."
fi
for tool in javac jar; do
  command -v "$tool" >/dev/null || die "$tool was not found: the fix is compiled with a JDK 17" \
    "(Debian/Ubuntu: apt-get install openjdk-17-jdk-headless)"
done

sources=("$HERE/src/torchservefix/Agent.java" "$HERE/src/$REPLACED.java")
stamp="$( { echo "$MODEL_SERVER_JAR_SHA256"; javac -version 2>&1; cat "${BASH_SOURCE[0]}" "${sources[@]}"; } \
  | sha256sum | cut -c1-16)"
if [ -f "$OUT/torchserve-fix.jar" ] && [ "$(cat "$OUT/stamp" 2>/dev/null)" = "$stamp" ]; then
  echo "torchserve_fix: $OUT/torchserve-fix.jar is up to date"
  exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
javac --release 17 -Xlint:all -Werror -encoding UTF-8 -cp "$JAR" -d "$tmp/classes" "${sources[@]}"
# Every class compiled into TorchServe's packages must be one the agent swaps in.
extra="$(cd "$tmp/classes" && find org -name '*.class' ! -path "$REPLACED.class")"
[ -z "$extra" ] || die "classes the agent would not load: $extra (no nested classes in the replacement)"
mkdir -p "$tmp/jar/torchserve_fix/replacements/$(dirname "$REPLACED")"
cp "$tmp/classes/$REPLACED.class" "$tmp/jar/torchserve_fix/replacements/$REPLACED.class"
cp -r "$tmp/classes/torchservefix" "$tmp/jar/"
cat > "$tmp/manifest.txt" <<EOF
Premain-Class: torchservefix.Agent
TorchServe-Version: $TORCHSERVE_VERSION
Model-Server-Jar-SHA256: $MODEL_SERVER_JAR_SHA256
Replaced-Classes: $REPLACED
EOF
jar --create --file "$tmp/torchserve-fix.jar" --manifest "$tmp/manifest.txt" -C "$tmp/jar" .
mkdir -p "$OUT"
mv "$tmp/torchserve-fix.jar" "$OUT/torchserve-fix.jar"
echo "$stamp" > "$OUT/stamp"
echo "torchserve_fix: built $OUT/torchserve-fix.jar for TorchServe $TORCHSERVE_VERSION"
