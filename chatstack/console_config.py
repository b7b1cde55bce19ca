"""Where the console's TorchServe lives: its config, model store, run folder and ports."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from chatstack.gateway_process import ADDRESS_PROPERTY as GATEWAY_ADDRESS_PROPERTY
from chatstack.torchserve_process import ROOT, TorchServeProcess


@dataclass(frozen=True)
class ConsoleConfig:
    """Environment variables override the defaults so tests (and a second console) can
    use their own folders and ports: CHATSTACK_CONFIG, CHATSTACK_MODEL_STORE,
    CHATSTACK_RUN_DIR, CHATSTACK_PORTS=INFERENCE,MANAGEMENT,METRICS[,GRPC_INFERENCE,
    GRPC_MANAGEMENT[,OPENAI_GATEWAY]] (ports on 127.0.0.1; TorchServe always opens its two gRPC
    ports too, and Start opens the OpenAI gateway's, 8000 unless given, so two consoles need all six),
    and CHATSTACK_MODEL_FOLDERS: the folders (separated by ':') whose GGUF files and Hugging
    Face snapshots the console may package; nothing outside them can be added from a browser."""
    config: Path = ROOT / "config.properties"
    model_store: Path = ROOT / "model_store"
    run_dir: Path = ROOT / ".run"
    overrides: tuple[tuple[str, str], ...] = ()
    # package_llama.sh keeps the default model and converted snapshots here
    model_folders: tuple[Path, ...] = (ROOT / "models",)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "ConsoleConfig":
        env = os.environ if env is None else env
        return cls(config=Path(env.get("CHATSTACK_CONFIG", cls.config)),
                   model_store=Path(env.get("CHATSTACK_MODEL_STORE", cls.model_store)),
                   run_dir=Path(env.get("CHATSTACK_RUN_DIR", cls.run_dir)),
                   overrides=port_overrides(env.get("CHATSTACK_PORTS", "")),
                   model_folders=tuple(Path(p) for p in env.get("CHATSTACK_MODEL_FOLDERS", "").split(os.pathsep)
                                       if p.strip()) or cls.model_folders)

    def process(self) -> TorchServeProcess:
        return TorchServeProcess(self.config, self.model_store, self.run_dir, overrides=dict(self.overrides))


def port_overrides(ports: str) -> tuple[tuple[str, str], ...]:
    """Config overrides from 'INFERENCE,MANAGEMENT,METRICS[,GRPC_INFERENCE,GRPC_MANAGEMENT[,OPENAI_GATEWAY]]'."""
    ports = ports.strip()
    if not ports:
        return ()
    numbers = [p.strip() for p in ports.split(",")]
    if len(numbers) not in (3, 5, 6) or not all(p.isdigit() for p in numbers):
        raise ValueError("CHATSTACK_PORTS must be INFERENCE,MANAGEMENT,METRICS[,GRPC_INFERENCE,"
                         f"GRPC_MANAGEMENT[,OPENAI_GATEWAY]] ports, got {ports!r}")
    http = tuple((f"{kind}_address", f"http://127.0.0.1:{port}")
                 for kind, port in zip(("inference", "management", "metrics"), numbers))
    grpc = tuple((f"grpc_{kind}_port", port) for kind, port in zip(("inference", "management"), numbers[3:5]))
    gateway = tuple((GATEWAY_ADDRESS_PROPERTY, f"http://127.0.0.1:{port}") for port in numbers[5:])
    return http + grpc + gateway
