"""What the console's pages show, as plain values: table rows, durations, masked keys.
The pages only lay these out."""

from __future__ import annotations

from chatstack.batch_tuning import LevelResult
from chatstack.capacity import WorkerLoad
from chatstack.metric_names import REQUESTS_FINISHED, declared_metrics, declared_units
from chatstack.metrics_history import MetricsSnapshot
from chatstack.model_archive import ArchiveInfo
from chatstack.model_registry import ModelVersion
from chatstack.process_stats import rss_mb

WORKER_COLUMNS = ["model", "version", "worker", "status", "pid", "slots in use", "memory MB", "started"]
QUEUE_COLUMNS = ["model", "version", "pending requests", "free queue places"]


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


def mask_key(key: str | None) -> str:
    return "•" * 8 if key else "(no key yet)"


def address_rows(addresses: dict[str, str]) -> list[dict]:
    return [{"API": kind, "address": address} for kind, address in addresses.items()]


def archive_rows(archives: list[ArchiveInfo]) -> list[dict]:
    return [{"archive": a.file, "model": a.model_name, "version": a.version, "MB": round(a.size_bytes / 1e6, 1),
             "batch size": a.settings.batch_size, "batch delay ms": a.settings.max_batch_delay,
             "continuous batching": a.settings.continuous_batching,
             "response timeout s": a.settings.response_timeout} for a in archives]


def model_rows(models: list[ModelVersion]) -> list[dict]:
    return [{"model": m.name, "version": m.version, "default": m.is_default, "archive": m.archive,
             "workers": f"{sum(w.get('status') == 'READY' for w in m.workers)}/{len(m.workers)} ready",
             "min/max workers": f"{m.settings.min_workers}/{m.settings.max_workers}",
             "batch size": m.settings.batch_size, "batch delay ms": m.settings.max_batch_delay,
             "continuous batching": m.settings.continuous_batching,
             "response timeout s": m.settings.response_timeout} for m in models]


def worker_rows(models: list[ModelVersion], slots: dict[int, tuple[int, int]] | None = None) -> list[dict]:
    """One row per worker; `slots` (metrics_history.slots_by_worker) gives its slots in use."""
    rows = []
    for m in models:
        for w in m.workers:
            reported = (w.get("memoryUsage") or 0) / 1e6
            memory = rss_mb(w.get("pid")) or (reported or None)
            used = (slots or {}).get(w.get("pid"))
            rows.append({"model": m.name, "version": m.version + (" (default)" if m.is_default else ""),
                         "worker": w.get("id"), "status": w.get("status"), "pid": w.get("pid"),
                         "slots in use": f"{used[0]} of {sum(used)}" if used else "–",
                         "memory MB": round(memory, 1) if memory else None, "started": w.get("startTime")})
    return rows


def queue_rows(models: list[ModelVersion]) -> list[dict]:
    return [{"model": m.name, "version": m.version, "pending requests": m.pending_requests,
             "free queue places": m.queue_capacity} for m in models]


# metrics.yaml's units as a reader writes them; Count is named from the metric (tokens, requests …).
UNIT_TEXT = {"ms": "ms", "Milliseconds": "ms", "Microseconds": "µs", "Percent": "%", "Megabytes": "MB",
             "Gigabytes": "GB"}
COUNTED_THINGS = (("tokens_per_second", "tokens/s"), ("tokens", "tokens"), ("requests", "requests"),
                  ("slots", "slots"), ("decode_steps", "steps"), ("sequences", "sequences"))


def metric_unit(name: str) -> str:
    """A metric's unit for a table column: metrics.yaml's unit, or what a Count counts."""
    unit = declared_units().get(name, "")
    if unit in UNIT_TEXT:
        return UNIT_TEXT[unit]
    lowered = name.lower()
    return next((text for part, text in COUNTED_THINGS if part in lowered), "count")


def format_number(value: float | None) -> str:
    """A figure as a person reads it: '–' when there is none, whole numbers with separators."""
    if value is None:
        return "–"
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.1f}" if abs(value) >= 10 else f"{value:,.2f}"


def with_unit(value: float | None, unit: str) -> str:
    text = format_number(value)
    return text if value is None or not unit else f"{text} {unit}"


def handler_metric_rows(snap: MetricsSnapshot) -> list[dict]:
    """The handler's counters and gauges (not its histograms' series: the charts show those),
    then finished requests by reason; '–' where the server has reported nothing yet."""
    names = declared_metrics()
    return ([{"metric": k, "value": format_number(snap.totals.get(k)), "unit": metric_unit(k)}
             for k in names.handler_plain_counters + names.handler_gauges]
            + [{"metric": f"{REQUESTS_FINISHED}{{Reason={r}}}", "value": format_number(v), "unit": "requests"}
               for r, v in sorted(snap.finished_by_reason.items())])


def torchserve_metric_rows(snap: MetricsSnapshot) -> list[dict]:
    names = declared_metrics()
    return [{"metric": k, "value": format_number(snap.totals.get(k)), "unit": metric_unit(k)}
            for k in names.torchserve_counters + names.torchserve_gauges]


CAPACITY_COLUMNS = ["model", "version", "worker", "status", "pid", "slots", "requests waiting", "tokens in context",
                    "memory MB", "CPU %"]
SLOT_COLUMNS = ["worker", "slot", "state", "tokens in context", "prompt tokens reused"]


def slots_summary(load: WorkerLoad) -> str:
    """'1 generating · 0 reading prompt · 7 idle', or what is known before the first report."""
    if load.slots:
        return " · ".join(f"{n} {state}" for state, n in reversed(load.slots_by_state().items()))
    if load.slots_total is not None:
        return f"{load.slots_in_use} in use of {load.slots_total}"
    return "no chat yet" if load.status == "READY" else "–"


def capacity_rows(loads: list[WorkerLoad]) -> list[dict]:
    """One row per worker; figures as text ('–' where unknown), units in the column names."""
    def whole(value: float | None) -> str:
        return format_number(None if value is None else round(value))
    return [{"model": w.model, "version": w.version + (" (default)" if w.is_default else ""), "worker": w.worker,
             "status": w.status, "pid": str(w.pid) if w.pid else "–", "slots": slots_summary(w),
             "requests waiting": format_number(w.requests_waiting), "tokens in context": format_number(w.context_tokens),
             "memory MB": whole(w.memory_mb), "CPU %": whole(w.cpu_percent)} for w in loads]


def slot_rows(loads: list[WorkerLoad]) -> list[dict]:
    return [{"worker": f"{w.model} {w.version}, pid {w.pid}", "slot": s.index, "state": s.state,
             "tokens in context": format_number(s.context_tokens),
             "prompt tokens reused": format_number(s.prompt_tokens_reused)} for w in loads for s in w.slots]


TUNING_COLUMNS = ["setting", "chats at once", "answers ok", "tokens/s", "TTFT p50 (s)", "TTFT p95 (s)", "note"]


def tuning_rows(rows: list[LevelResult]) -> list[dict]:
    """The tuner's measurements as the Tuning page's table: one row per setting and load."""
    def rounded(value: float | None, digits: int) -> float | None:
        return None if value is None else round(value, digits)
    return [{"setting": r.candidate.label, "chats at once": r.concurrency, "answers ok": f"{r.ok} of {r.requests}",
             "tokens/s": rounded(r.tokens_per_s, 1), "TTFT p50 (s)": rounded(r.ttft_p50_s, 2),
             "TTFT p95 (s)": rounded(r.ttft_p95_s, 2), "note": r.error or ""} for r in rows]


def tuning_points(rows: list[LevelResult]) -> list[dict]:
    """The chart's points: measured levels only (a level without answers has no figures)."""
    return [{"setting": r.candidate.label, "chats at once": r.concurrency, "tokens/s": r.tokens_per_s,
             "TTFT p95 (s)": r.ttft_p95_s} for r in rows if r.ok and r.tokens_per_s is not None]
