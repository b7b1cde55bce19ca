#!/usr/bin/env bash
# Build the container image (deploy/Containerfile) and chat through it, for real. Not part of the
# default test run: the build compiles llama.cpp (~10 min on 2 cores).
#
#   deploy/test_image.sh            build, write a KServe layout, serve it from the image, chat
#   KEEP=1 deploy/test_image.sh     keep the working container and the temp folder afterwards
#
# Made for a machine without a container registry and where `podman run` cannot start containers
# (this project's CI sandbox): the base image is debootstrapped from Debian's packages when no
# BASE_IMAGE is given and docker.io cannot be reached, builds use the vfs storage driver and chroot
# isolation, and the image's program runs with `buildah run`. Settings of this machine (its CA
# bundle, its local wheel folder) are passed here as build arguments, never baked into the
# Containerfile. Needs root, podman, buildah and debootstrap (apt-get install podman buildah debootstrap).
#
# Environment: IMAGE (default llama-chat-torchserve:test), BASE_IMAGE (default: docker.io's
# python:3.11-slim-bookworm if it can be pulled, else a local debootstrapped localbase:bookworm),
# DEBIAN_MIRROR (default: the first one apt uses), HOST_CA (default /etc/ssl/certs/ca-certificates.crt),
# HOST_WHEELS (a folder of wheels offered to pip, default /opt/wheels when it has torch's CPU build).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
IMAGE="${IMAGE:-llama-chat-torchserve:test}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
PODMAN=(podman --storage-driver vfs)
BUILDAH=(buildah --storage-driver vfs)
WORK="$(mktemp -d /tmp/llama-image-test.XXXXXX)"
CTR="llama-image-test-$$"
SERVER_SID=""
log() { echo "== $(date +%H:%M:%S) $*" >&2; }

cleanup() {
  if [ -n "$SERVER_SID" ]; then
    # every process of the server's session (buildah, tini, the launcher, java, the workers)
    for pid in $(ps -o pid= -s "$SERVER_SID" 2>/dev/null); do kill -TERM "$pid" 2>/dev/null || true; done
    sleep 3
    for pid in $(ps -o pid= -s "$SERVER_SID" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
  fi
  if [ "${KEEP:-0}" != 1 ]; then
    "${BUILDAH[@]}" rm "$CTR" >/dev/null 2>&1 || true
    rm -rf "$WORK"
  else
    echo "kept: container $CTR, folder $WORK" >&2
  fi
}
trap cleanup EXIT

for tool in podman buildah; do
  command -v $tool >/dev/null || { echo "test_image.sh: $tool is missing (apt-get install podman buildah debootstrap)" >&2; exit 2; }
done

# ---- base image -------------------------------------------------------------------------------
if [ -z "${BASE_IMAGE:-}" ]; then
  if "${PODMAN[@]}" image exists docker.io/library/python:3.11-slim-bookworm \
     || timeout 60 "${PODMAN[@]}" pull -q docker.io/library/python:3.11-slim-bookworm >/dev/null 2>&1; then
    BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm
  else
    BASE_IMAGE=localbase:bookworm
    if ! "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
      command -v debootstrap >/dev/null || { echo "test_image.sh: no registry and no debootstrap" >&2; exit 2; }
      MIRROR="${DEBIAN_MIRROR:-$(grep -rhoE '^(URIs:|deb) +https?://[^ ]+/debian\b' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null | head -1 | awk "{print \$2}" || true)}"
      MIRROR="${MIRROR:-http://deb.debian.org/debian}"
      log "no registry: debootstrapping $BASE_IMAGE from $MIRROR"
      debootstrap --variant=minbase bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
      tar -C "$WORK/rootfs" -c . | "${PODMAN[@]}" import - "$BASE_IMAGE" >/dev/null
      rm -rf "$WORK/rootfs"
    fi
  fi
fi
log "base image: $BASE_IMAGE"

# ---- build --------------------------------------------------------------------------------------
BUILD_ARGS=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
HOST_CA="${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}"
[ -f "$HOST_CA" ] && BUILD_ARGS+=(-v "$HOST_CA:/host-ca.crt:ro" --build-arg PIP_CERT=/host-ca.crt)
HOST_WHEELS="${HOST_WHEELS:-$(ls /opt/wheels/torch-*+cpu-*.whl >/dev/null 2>&1 && echo /opt/wheels || true)}"
if [ -n "$HOST_WHEELS" ]; then
  # torch's CPU build from a local folder instead of download.pytorch.org
  BUILD_ARGS+=(-v "$HOST_WHEELS:/host-wheels:ro" --build-arg PIP_FIND_LINKS=/host-wheels --build-arg PIP_EXTRA_INDEX_URL=)
fi
log "building $IMAGE (podman, vfs, chroot isolation)"
start=$(date +%s)
"${PODMAN[@]}" build --isolation chroot --network host --format docker \
  -f deploy/Containerfile --ignorefile deploy/Containerfile.dockerignore \
  "${BUILD_ARGS[@]}" -t "$IMAGE" . 2>&1 | tee "$WORK/build.log" | grep -E '^(STEP|COMMIT|llama-cpp-python|Successfully)' >&2
[ "${PIPESTATUS[0]}" = 0 ] || { tail -40 "$WORK/build.log" >&2; exit 1; }
BUILD_S=$(( $(date +%s) - start ))
SIZE=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE")
log "built $IMAGE in ${BUILD_S}s; size $((SIZE / 1000000)) MB"
"${PODMAN[@]}" image inspect --format '{{.Config.User}} {{.Config.Healthcheck}}' "$IMAGE" >&2

# ---- the image holds what it must, and no compiler ---------------------------------------------
"${BUILDAH[@]}" from --name "$CTR" "$IMAGE" >/dev/null
in_image() { "${BUILDAH[@]}" run --isolation chroot --network host "$@"; }
[ "$(in_image "$CTR" -- id -u)" = 1000 ] || { echo "FAIL: the image does not run as uid 1000" >&2; exit 1; }
if in_image "$CTR" -- sh -c 'command -v gcc || command -v cc || command -v cmake || command -v make'; then
  echo "FAIL: a compiler or build tool is in the final image" >&2; exit 1
fi
# (sed reads it all: no SIGPIPE under pipefail; the image's JAVA_TOOL_OPTIONS adds a "Picked up" line)
in_image "$CTR" -- java -version 2>&1 | sed -n '/version/p' >&2
in_image "$CTR" -- python -c "import llama_cpp, ts, torch; print('llama-cpp-python', llama_cpp.__version__, 'torch', torch.__version__)" >&2

# ---- the KServe layout, served from the image ---------------------------------------------------
log "writing the KServe layout (package_llama.sh --kserve)"
# (own TMPDIR: torch-model-archiver stages in $TMPDIR/<model name>, shared by concurrent packagings)
mkdir -p "$WORK/tmp"
TMPDIR="$WORK/tmp" ./package_llama.sh --model-store "$WORK/store" --config deploy/kserve/model-config-cpu.yaml --kserve "$WORK/layout" >/dev/null
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
INF=$(free_port); MET=$(free_port); MGT=$(free_port); GRPC1=$(free_port); GRPC2=$(free_port)
# the host network is shared with other programs: the layout's ports become free ones
sed -i -E "s|^(inference_address=http://[^:]+:)[0-9]+|\1$INF|; s|^(metrics_address=http://[^:]+:)[0-9]+|\1$MET|; s|^(management_address=http://[^:]+:)[0-9]+|\1$MGT|; /^grpc_(inference|management)_port=/d" \
  "$WORK/layout/config/config.properties"
printf 'grpc_inference_port=%s\ngrpc_management_port=%s\n' "$GRPC1" "$GRPC2" >> "$WORK/layout/config/config.properties"
chmod -R a+rX "$WORK/layout"
log "starting TorchServe in the image (inference :$INF, metrics :$MET)"
setsid "${BUILDAH[@]}" run --isolation chroot --network host -v "$WORK/layout:/mnt/models:ro" "$CTR" -- \
  /usr/bin/tini -g -- torchserve --start --foreground --ncs \
  --model-store=/mnt/models/model-store --ts-config=/mnt/models/config/config.properties \
  >"$WORK/server.log" 2>&1 &
SERVER_SID=$!
for _ in $(seq 1 180); do
  curl -sf "http://127.0.0.1:$INF/ping" 2>/dev/null | grep -q Healthy && break
  kill -0 "$SERVER_SID" 2>/dev/null || { tail -30 "$WORK/server.log" >&2; echo "FAIL: the server exited" >&2; exit 1; }
  sleep 1
done
curl -sf "http://127.0.0.1:$INF/ping" | grep -q Healthy || { tail -30 "$WORK/server.log" >&2; echo "FAIL: not healthy" >&2; exit 1; }
grep -q "torchserve_fix: continuous batching" "$WORK/server.log" \
  || { echo "FAIL: TorchServe runs without torchserve_fix's ContinuousBatching (JAVA_TOOL_OPTIONS)" >&2; exit 1; }
log "healthy, with torchserve_fix's continuous batching; the image's own HEALTHCHECK command:"
in_image --env "TS_HEALTH_URL=http://127.0.0.1:$INF/ping" "$CTR" -- \
  python -c "import os, sys, urllib.request as u; sys.exit(0 if b'Healthy' in u.urlopen(os.environ['TS_HEALTH_URL'], timeout=4).read() else 1)" \
  && echo "healthcheck: ok" >&2

log "chatting from the host"
"$PY" - "$INF" "$MET" "$MGT" <<'PY'
import json, sys, requests
from openai import OpenAI
inf, met, mgt = sys.argv[1:]
base = f"http://127.0.0.1:{inf}"
messages = [{"role": "user", "content": "What is the capital of France?"}]
r = requests.post(f"{base}/predictions/llama", json={"messages": messages, "stream": True,
                  "temperature": 0, "max_tokens": 24}, stream=True, timeout=120)
r.raise_for_status()
chunks = [json.loads(line) for line in r.iter_lines() if line.strip()]
streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
assert len(chunks) > 2 and streamed.strip(), chunks
print("stream:", repr(streamed))
client = OpenAI(base_url=f"{base}/predictions/llama/1.0/v1", api_key="unused")
answer = client.chat.completions.create(model="llama", messages=messages, temperature=0, max_tokens=24)
text = answer.choices[0].message.content
assert text == streamed, (text, streamed)
print("openai:", repr(text))
metrics = requests.get(f"http://127.0.0.1:{met}/metrics", timeout=10).text
assert "ts_inference_requests_total" in metrics and "llama_tokens_generated" in metrics, metrics[:2000]
print("metrics: ts_inference_requests_total and llama_tokens_generated present")
try:
    requests.get(f"http://127.0.0.1:{mgt}/models", timeout=5)
    print("management API answers on the pod's loopback (as configured)")
except requests.ConnectionError:
    print("management API: not reachable")
PY
log "PASS: image $IMAGE built in ${BUILD_S}s, $((SIZE / 1000000)) MB, served a chat"
