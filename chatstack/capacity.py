"""How full each worker is: its slots by state (idle, reading prompt, generating) with the
tokens each holds in context and the prompt tokens its request reused, the requests waiting
for a slot, and the worker's memory and CPU. Read from the handler's per-worker and per-slot
gauges (metric_names) and the worker processes (process_stats)."""

from __future__ import annotations

from dataclasses import dataclass, field

from chatstack.metric_names import (REQUESTS_WAITING, SLOT_CONTEXT_TOKENS, SLOT_PROMPT_TOKENS_REUSED, SLOT_STATE,
                                    SLOT_STATES, SLOTS_ACTIVE, SLOTS_FREE)
from chatstack.model_registry import ModelVersion
from chatstack.process_stats import CpuMeter, rss_mb

Samples = list[tuple[str, dict[str, str], float]]


@dataclass
class SlotLoad:
    index: int
    state: str                       # SLOT_STATES' names: idle, reading prompt, generating
    context_tokens: int | None = None
    prompt_tokens_reused: int | None = None


@dataclass
class WorkerLoad:
    model: str
    version: str
    is_default: bool
    worker: str
    status: str
    pid: int | None
    slots: list[SlotLoad] = field(default_factory=list)   # empty until the worker reported them
    slots_in_use: int | None = None
    slots_total: int | None = None
    requests_waiting: int | None = None
    memory_mb: float | None = None
    cpu_percent: float | None = None

    @property
    def reported(self) -> bool:
        """Whether the worker's handler has reported its slots yet (it does once it served a chat)."""
        return bool(self.slots) or self.slots_total is not None

    def slots_by_state(self) -> dict[str, int]:
        """{state: slots in it}, every state named (zero included), in SLOT_STATES' order."""
        counts = {name: 0 for name in SLOT_STATES.values()}
        for slot in self.slots:
            counts[slot.state] = counts.get(slot.state, 0) + 1
        return counts

    @property
    def context_tokens(self) -> int | None:
        known = [s.context_tokens for s in self.slots if s.context_tokens is not None]
        return sum(known) if known else None


def _by_pid(samples: Samples, name: str) -> dict[int, float]:
    return {int(labels["WorkerPid"]): value for metric, labels, value in samples
            if metric == name and labels.get("WorkerPid", "").isdigit()}


def _slots_by_pid(samples: Samples) -> dict[int, dict[int, SlotLoad]]:
    slots: dict[int, dict[int, SlotLoad]] = {}
    for metric, labels, value in samples:
        if metric not in (SLOT_STATE, SLOT_CONTEXT_TOKENS, SLOT_PROMPT_TOKENS_REUSED):
            continue
        if not (labels.get("WorkerPid", "").isdigit() and labels.get("Slot", "").isdigit()):
            continue
        index = int(labels["Slot"])
        slot = slots.setdefault(int(labels["WorkerPid"]), {}).setdefault(index, SlotLoad(index, SLOT_STATES[0]))
        if metric == SLOT_STATE:
            slot.state = SLOT_STATES.get(int(value), f"state {int(value)}")
        elif metric == SLOT_CONTEXT_TOKENS:
            slot.context_tokens = int(value)
        else:
            slot.prompt_tokens_reused = int(value)
    return slots


def worker_loads(models: list[ModelVersion], samples: Samples, cpu: CpuMeter | None = None) -> list[WorkerLoad]:
    """One entry per worker of every registered version, default versions first."""
    slots, active, free = _slots_by_pid(samples), _by_pid(samples, SLOTS_ACTIVE), _by_pid(samples, SLOTS_FREE)
    waiting = _by_pid(samples, REQUESTS_WAITING)
    loads = []
    for m in sorted(models, key=lambda m: (m.name, not m.is_default, m.version)):
        for w in m.workers:
            pid = w.get("pid") if isinstance(w.get("pid"), int) and w.get("pid") > 0 else None
            load = WorkerLoad(m.name, m.version, m.is_default, str(w.get("id")), str(w.get("status")), pid)
            if pid is not None:
                load.slots = [slots[pid][i] for i in sorted(slots.get(pid, {}))]
                if pid in active or pid in free:
                    load.slots_in_use = int(active.get(pid, 0))
                    load.slots_total = int(active.get(pid, 0) + free.get(pid, 0))
                load.requests_waiting = int(waiting[pid]) if pid in waiting else None
                load.memory_mb = rss_mb(pid)
                load.cpu_percent = cpu.percent(pid) if cpu else None
            loads.append(load)
    return loads
