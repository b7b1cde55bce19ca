"""The `handler:` section of model-config.yaml, typed, with every default in one place.

TorchServe hands the archive's model-config.yaml to the handler as a dict; `load_settings`
turns its `handler:` section into `HandlerSettings` or fails the model load with an error
naming the key (a wrong type, or a key the handler does not know). `engine_config` then
resolves what depends on the worker (slots from batchSize, threads from the CPUs, the GPU
TorchServe gave it) into the engine's `EngineConfig`.
"""

from __future__ import annotations

import os
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llama_engine import EngineConfig

PositiveInt = Annotated[int, Field(ge=1)]
Count = Annotated[int, Field(ge=0)]


class SettingsError(ValueError):
    """model-config.yaml cannot be served as written."""


class SamplingDefaults(BaseModel):
    """`handler.sampling`: the server's values for requests that do not set them. A key left
    out here takes the built-in default (llama_engine.SamplingParams, llama.cpp's usual values)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    temperature: Annotated[float, Field(ge=0.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Count | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repeat_penalty: Annotated[float, Field(gt=0.0)] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    penalty_last_n: Count | None = None
    seed: int | None = None


class HandlerSettings(BaseModel):
    """The `handler:` section of model-config.yaml (the comments there say what each key does)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model_path: str = "model.gguf"          # relative to the archive's folder, or absolute
    n_ctx: PositiveInt = 2048               # context length of each chat (each slot), in tokens
    n_slots: Count = 0                      # 0: batchSize
    n_threads: Count = 0                    # 0: the worker's CPUs / max(minWorkers, maxWorkers)
    n_batch: PositiveInt = 512
    prefill_chunk: PositiveInt = 256
    step_budget_ms: Annotated[float, Field(ge=0.0)] = 50.0
    max_tokens: PositiveInt = 512           # answer length when a request does not say
    request_timeout_s: Annotated[float, Field(gt=0.0)] | None = None   # None: the model's responseTimeout
    n_gpu_layers: int = 0
    main_gpu: Count = 0
    split_mode: Literal[0, 1, 2] = 1        # llama_split_mode: none, layer, row
    tensor_split: list[Annotated[float, Field(ge=0.0)]] | None = None
    flash_attn: bool = True
    cache_answers: bool = True
    sampling: SamplingDefaults = Field(default_factory=SamplingDefaults)

    @model_validator(mode="after")
    def _answer_fits(self):
        if self.max_tokens >= self.n_ctx:
            raise ValueError(f"max_tokens ({self.max_tokens}) must be below n_ctx ({self.n_ctx}), "
                             "or every request that does not set max_tokens is refused")
        return self


def load_settings(model_yaml_config: dict | None) -> HandlerSettings:
    """The `handler:` section of a model-config.yaml TorchServe has parsed."""
    section = (model_yaml_config or {}).get("handler") or {}
    if not isinstance(section, dict):
        raise SettingsError(f"model-config.yaml: `handler` must be a mapping of keys, not {type(section).__name__}")
    try:
        return HandlerSettings.model_validate(section)
    except ValidationError as e:
        raise SettingsError(_describe(e)) from None


def _describe(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        key = ".".join(["handler", *(str(p) for p in err["loc"])])
        if err["type"] == "extra_forbidden":
            problems.append(f"{key}: is not a key the handler knows (misspelt?)")
        elif err["loc"]:
            problems.append(f"{key}: {err['msg']} (got {err['input']!r})")
        else:
            problems.append(f"{key}: {err['msg'].removeprefix('Value error, ')}")
    return "model-config.yaml: " + "; ".join(problems)


# config.properties' default_response_timeout, for a model-config.yaml without responseTimeout
DEFAULT_RESPONSE_TIMEOUT_S = 300


def request_timeout_s(settings: HandlerSettings, model_yaml_config: dict | None) -> float:
    """How long a request may run: handler.request_timeout_s, else the model's responseTimeout."""
    if settings.request_timeout_s is not None:
        return settings.request_timeout_s
    return float((model_yaml_config or {}).get("responseTimeout") or DEFAULT_RESPONSE_TIMEOUT_S)


def available_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup CPU quota (in a
    container os.cpu_count() is the node's core count, not the pod's limit)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cpus


def workers_sharing_cpus(model_yaml_config: dict | None) -> int:
    """How many workers of this model may share the CPUs: the most it can be scaled to
    (maxWorkers), at least minWorkers, so scaling up does not oversubscribe the cores."""
    config = model_yaml_config or {}
    return max(1, int(config.get("minWorkers") or 1), int(config.get("maxWorkers") or 1))


def engine_config(settings: HandlerSettings, batch_size: int, n_workers: int, gpu_id: int | None,
                  cpus: int | None = None) -> EngineConfig:
    """The engine's configuration for one worker: TorchServe's batch size, the number of
    workers sharing the CPUs, and the GPU TorchServe gave this worker (None on a CPU host)."""
    cpus = available_cpus() if cpus is None else cpus
    n_threads = settings.n_threads or max(1, cpus // max(1, n_workers))
    # TorchServe gives each worker a GPU (gpu_id); without an explicit split, the worker uses just that one.
    one_gpu_per_worker = bool(settings.n_gpu_layers) and gpu_id is not None and not settings.tensor_split
    return EngineConfig(
        n_slots=settings.n_slots or max(1, batch_size),
        n_ctx_per_slot=settings.n_ctx,
        n_batch=settings.n_batch,
        prefill_chunk=settings.prefill_chunk,
        n_threads=n_threads,
        n_gpu_layers=settings.n_gpu_layers,
        main_gpu=int(gpu_id) if one_gpu_per_worker else settings.main_gpu,
        # llama.cpp only honours main_gpu with split mode "none"; otherwise it spreads layers over all GPUs.
        split_mode=0 if one_gpu_per_worker else settings.split_mode,
        tensor_split=settings.tensor_split,
        flash_attn=settings.flash_attn,
        cache_answers=settings.cache_answers,
    )
