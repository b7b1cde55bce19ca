"""What the console's pages show, as plain values: table rows, durations, masked keys.
The pages only lay these out."""

from __future__ import annotations

from chatstack.metric_names import REQUESTS_FINISHED, declared_metrics
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


def handler_metric_rows(snap: MetricsSnapshot) -> list[dict]:
    """The handler's counters and gauges, then finished requests by reason."""
    names = declared_metrics()
    return ([{"metric": k, "value": snap.totals.get(k)} for k in names.handler_counters + names.handler_gauges]
            + [{"metric": f"{REQUESTS_FINISHED}{{Reason={r}}}", "value": v}
               for r, v in sorted(snap.finished_by_reason.items())])


def torchserve_metric_rows(snap: MetricsSnapshot) -> list[dict]:
    names = declared_metrics()
    return [{"metric": k, "value": snap.totals.get(k)} for k in names.torchserve_counters + names.torchserve_gauges]
