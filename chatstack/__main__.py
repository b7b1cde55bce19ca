"""Command line: python -m chatstack start|stop|status|key

  start   start TorchServe with config.properties (packaging and registering the
          default model archive unless --no-model); returns once it is ready
  stop    stop it
  status  say whether it runs and list the registered models
  key     print the inference key clients need (from key_file.json);
          --management prints the management key instead

The run folder (key_file.json, logs) is .run/ unless CHATSTACK_RUN_DIR says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from chatstack.torchserve_client import TorchServeError
from chatstack.torchserve_process import ROOT, StartError, TorchServeProcess


def ensure_archive(store, name="llama") -> str:
    archive = store / f"{name}.mar"
    if not archive.exists():
        subprocess.run([str(ROOT / "package_llama.sh"), "--model-store", str(store)], check=True)
    return archive.name


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
            server.model_store.mkdir(parents=True, exist_ok=True)
            archive = None if args.no_model else ensure_archive(server.model_store)
            server.start()
            print(f"TorchServe is up (pid {server.pid()}): inference {server.address('inference')}, "
                  f"management {server.address('management')}, metrics {server.address('metrics')}")
            if archive:
                print(server.client().register(archive, timeout=600))
            print(f"Keys: {server.key_file}")
        elif args.command == "stop":
            print("stopped" if server.stop() else "TorchServe was not running")
        elif args.command == "status":
            if not server.is_running():
                print("TorchServe is not running")
                return 1
            client = server.client()
            print(f"pid {server.pid()}, ping: {client.ping()}")
            print(json.dumps(client.list_models(), indent=2))
        elif args.command == "key":
            keys = server.client().keys
            key = keys.management if args.management else keys.inference
            if not key:
                print(f"no key in {server.key_file}: start TorchServe first", file=sys.stderr)
                return 1
            print(key)
    except (StartError, TorchServeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
