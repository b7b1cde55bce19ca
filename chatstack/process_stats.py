"""Memory and CPU time of local processes (TorchServe's workers), read with psutil."""

from __future__ import annotations

import psutil


def rss_mb(pid: int | None) -> float | None:
    """Resident memory of a local process in MB (TorchServe's own memoryUsage is often 0)."""
    if not pid or pid < 0:  # TorchServe says -1 for a worker without a process
        return None
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:
        return None


def cpu_seconds(pid: int) -> float | None:
    """CPU time a local process has used (user + system), or None when it is gone."""
    if pid < 0:
        return None
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return times.user + times.system


class CpuMeter:
    """CPU use of local processes between two readings, in percent of one core (200 = two cores busy).

    psutil measures from the previous call on the same Process object, so the meter keeps
    them: the first reading of a process has nothing to compare with and gives None."""

    def __init__(self):
        self._processes: dict[int, psutil.Process] = {}

    def percent(self, pid: int | None) -> float | None:
        if not pid or pid < 0:
            return None
        try:
            process = self._processes.get(pid)
            if process is None:
                self._processes[pid] = psutil.Process(pid)
                self._processes[pid].cpu_percent(None)
                return None
            return process.cpu_percent(None)
        except psutil.Error:
            self._processes.pop(pid, None)
            return None
