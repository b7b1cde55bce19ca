"""Command line: python -m chatstack start|stop|status|key

  start   start TorchServe with config.properties, the way the admin console's Start
          does: with an empty model store it first builds the default model archive,
          then registers the default model unless --no-model; the OpenAI gateway
          (one base URL for every model, openai_gateway_address, default
          http://127.0.0.1:8000/v1) starts beside it; returns once it is ready
  stop    stop both
  status  say whether they run and list the registered models
  key     print the inference key clients need (from key_file.json);
          --management prints the management key instead

The run folder (key_file.json, logs) is .run/ unless CHATSTACK_RUN_DIR says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from chatstack.model_archive import ArchiveError
from chatstack.gateway_process import GatewayProcess
from chatstack.server_lifecycle import start_server, stop_server
from chatstack.torchserve_client import TorchServeError
from chatstack.torchserve_process import ROOT, TorchServeProcess


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chatstack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["start", "stop", "status", "key"])
    parser.add_argument("--config", default=str(ROOT / "config.properties"))
    parser.add_argument("--model-store", default=str(ROOT / "model_store"))
    parser.add_argument("--run-dir", default=os.environ.get("CHATSTACK_RUN_DIR", str(ROOT / ".run")))
    parser.add_argument("--management", action="store_true", help="with key: print the management key")
    parser.add_argument("--no-model", action="store_true", help="start without registering the default model")
    args = parser.parse_args(argv)
    server = TorchServeProcess(args.config, args.model_store, args.run_dir)
    try:
        if args.command == "start":
            start_server(server, register_default=not args.no_model, on_step=print)
            gateway = GatewayProcess(server)
            print(f"Inference {server.address('inference')}, management {server.address('management')}, "
                  f"metrics {server.address('metrics')}, OpenAI base URL {gateway.base_url}"
                  f"{'' if gateway.is_running() else ' (not running)'}; keys in {server.key_file}")
        elif args.command == "stop":
            print(stop_server(server))
        elif args.command == "status":
            if not server.is_running():
                print("TorchServe is not running")
                return 1
            client = server.client()
            gateway = GatewayProcess(server)
            print(f"pid {server.pid()}, ping: {client.ping()}; OpenAI gateway {gateway.base_url}: "
                  + (f"running (pid {gateway.pid()})" if gateway.is_running() else "not running"))
            print(json.dumps(client.list_models(), indent=2))
        elif args.command == "key":
            keys = server.client().keys
            key = keys.management if args.management else keys.inference
            if not key:
                print(f"no key in {server.key_file}: start TorchServe first", file=sys.stderr)
                return 1
            print(key)
    except (ArchiveError, TorchServeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
