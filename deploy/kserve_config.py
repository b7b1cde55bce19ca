#!/usr/bin/env python3
"""Write the config.properties of a KServe storage layout (stdout).

    python deploy/kserve_config.py --model llama > LAYOUT/config/config.properties

package_llama.sh --kserve DIR runs this. The result is the repo's config.properties (timeouts,
request sizes, queue length) with what a pod needs instead:

- inference on 0.0.0.0:8080, the port KServe routes to (the ServingRuntime's containerPort);
- metrics on 0.0.0.0:8082 in Prometheus format, scraped through the runtime's
  prometheus.kserve.io annotations; metrics_config is the layout's own metrics.yaml
  (package_llama.sh copies it next to this file), which declares the handler's llama_* metrics:
  TorchServe drops metrics that are not declared;
- management on 127.0.0.1:8081: only processes inside the pod reach it (kubectl exec /
  port-forward). The model is loaded at start-up (load_models), so nothing needs to register
  models, and registration is off (enable_model_api=false); --management-address opens it;
- token authorization off by default: TorchServe makes a random key per process at start-up
  (key_file.json in its working directory), so every replica would have a different key and a
  load-balanced client could not know which. Requests are authenticated at the ingress instead
  (deploy/README.md, Security). --token-auth turns TorchServe's keys on (one replica; the
  operator reads the key with kubectl exec ... cat /home/model-server/key_file.json).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from chatstack.torchserve_process import read_properties  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LAYOUT_ROOT = "/mnt/models"

# Keys of the repo's config.properties that describe the laptop set-up, not a pod's.
REPLACED = {"inference_address", "management_address", "metrics_address", "enable_model_api", "allowed_urls",
            "disable_token_authorization", "metrics_config", "model_store", "load_models", "metrics_mode",
            "grpc_inference_address", "grpc_management_address"}


def address(value: str) -> str:
    if not re.fullmatch(r"https?://[^\s/:]+:\d{1,5}", value):
        raise argparse.ArgumentTypeError(f"{value!r} is not an address like http://0.0.0.0:8080")
    return value


def build(model: str, *, root: str = LAYOUT_ROOT, inference: str = "http://0.0.0.0:8080",
          management: str = "http://127.0.0.1:8081", metrics: str = "http://0.0.0.0:8082",
          token_auth: bool = False, model_api: bool = False, base: Path = ROOT / "config.properties") -> str:
    kept = {k: v for k, v in read_properties(base).items() if k not in REPLACED}
    lines = [
        f"# TorchServe config of a KServe storage layout: written by deploy/kserve_config.py --model {model}.",
        f"# It is read from {root}/config/config.properties (the ServingRuntime's --ts-config).",
        "# Inference: the port KServe routes to, on the pod's addresses.",
        f"inference_address={inference}",
        "# Management: loopback unless the operator asked otherwise (kubectl exec / port-forward reach it).",
        f"management_address={management}",
        "# Prometheus metrics, scraped through the ServingRuntime's prometheus.kserve.io annotations.",
        f"metrics_address={metrics}",
        "metrics_mode=prometheus",
        "# TorchServe always opens its gRPC APIs too: on loopback, KServe routes HTTP only.",
        "grpc_inference_address=127.0.0.1",
        "grpc_management_address=127.0.0.1",
        "# Declares the handler's llama_* metrics; TorchServe exports only declared metrics.",
        f"metrics_config={root}/config/metrics.yaml",
        "# The model is loaded at start-up from the layout's model store.",
        f"model_store={root}/model-store",
        f"load_models={model}.mar",
        "# Registration through the management API: " + ("on (asked for)." if model_api else "off, the model is loaded at start-up."),
        f"enable_model_api={'true' if model_api else 'false'}",
        "allowed_urls=^model-store-only$",
    ]
    if token_auth:
        lines += ["# TorchServe token authorization: keys in key_file.json of the working directory",
                  "# (/home/model-server in the image), one set per replica, new at each start.",
                  "disable_token_authorization=false"]
    else:
        lines += ["# No TorchServe keys: every replica would make its own. Authenticate at the ingress",
                  "# (deploy/README.md, Security); the management API stays on loopback.",
                  "disable_token_authorization=true"]
    lines.append("# From the repo's config.properties:")
    lines += [f"{k}={v}" for k, v in kept.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model name: loads NAME.mar from the layout's model store")
    parser.add_argument("--root", default=LAYOUT_ROOT, help=f"where the layout is mounted (default {LAYOUT_ROOT})")
    parser.add_argument("--inference-address", type=address, default="http://0.0.0.0:8080")
    parser.add_argument("--metrics-address", type=address, default="http://0.0.0.0:8082")
    parser.add_argument("--management-address", type=address, default="http://127.0.0.1:8081",
                        help="default: loopback only; e.g. http://0.0.0.0:8081 to reach it from outside the pod "
                             "(then use --token-auth or a NetworkPolicy)")
    parser.add_argument("--token-auth", action="store_true",
                        help="turn on TorchServe's token authorization (one replica; see deploy/README.md)")
    parser.add_argument("--model-api", action="store_true", help="allow registering models through the management API")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", args.model):
        parser.error(f"model name {args.model!r} may only hold letters, digits, _ and -")
    if "127.0.0.1" not in args.management_address and "localhost" not in args.management_address \
            and not args.token_auth:
        print("kserve_config.py: warning: the management API listens beyond the pod's loopback without "
              "token authorization; restrict it with a NetworkPolicy", file=sys.stderr)
    sys.stdout.write(build(args.model, root=args.root.rstrip("/"), inference=args.inference_address,
                           management=args.management_address, metrics=args.metrics_address,
                           token_auth=args.token_auth, model_api=args.model_api))
    return 0


if __name__ == "__main__":
    sys.exit(main())
