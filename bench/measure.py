"""What the benchmark measures about processes and the machine: CPU seconds, RSS, and other tenants' load."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import trio

MIB = 1_048_576
RSS_INTERVAL = 0.05
_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(process: psutil.Process) -> float:
    """User plus system CPU seconds of ``process`` so far (all its threads)."""
    times = process.cpu_times()
    return float(times.user + times.system)


def main_thread_cpu(process: psutil.Process) -> float:
    """CPU seconds of the process's main thread (the trio loop); the rest is SQLite's worker threads."""
    for thread in process.threads():
        if thread.id == process.pid:
            return float(thread.user_time + thread.system_time)
    return 0.0


def vm_hwm(pid: int) -> int | None:
    """The kernel's peak RSS of ``pid`` (``VmHWM``), in bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass(frozen=True, slots=True)
class MachineCpu:
    """A snapshot of the whole machine's busy CPU time (``/proc/stat``) and of the bench's own processes.

    The machine is shared: the difference between the machine's busy time and ours over a phase is what
    other tenants used meanwhile, reported so that a slow phase can be told from a busy machine.
    """

    at: float
    busy: float
    ours: float

    @classmethod
    def take(cls, pids: list[int]) -> MachineCpu:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
        busy = (user + nice + system + irq + softirq + steal) / _TICKS
        ours = 0.0
        for pid in {os.getpid(), *pids}:
            with contextlib.suppress(psutil.NoSuchProcess):
                ours += cpu_seconds(psutil.Process(pid))
        return cls(time.perf_counter(), busy, ours)

    def since(self, before: MachineCpu, extra_ours: float = 0.0) -> dict[str, float]:
        """Average cores busy over the phase: the whole machine, and everyone but the bench's processes.

        ``extra_ours`` is CPU of bench processes that ended within the phase (not in either snapshot).
        """
        seconds = self.at - before.at
        machine = (self.busy - before.busy) / seconds
        ours = (self.ours - before.ours + extra_ours) / seconds
        return {"machine_cores_busy": machine, "other_tenants_cores_busy": max(0.0, machine - ours)}


class RssSampler:
    """Samples a process's RSS every :data:`RSS_INTERVAL` seconds; keeps the peak and a 1 s series."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self.series: list[tuple[float, int]] = []

    async def run(self, started: float) -> None:
        next_point = 0.0
        while True:
            rss = self.process.memory_info().rss
            self.peak = max(self.peak, rss)
            at = time.perf_counter() - started
            if at >= next_point:
                self.series.append((round(at, 2), rss))
                next_point += 1.0
            await trio.sleep(RSS_INTERVAL)


def machine() -> dict[str, Any]:
    """The machine the results come from."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "hostname": platform.node(),
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "memory_total_mib": psutil.virtual_memory().total // MIB,
        "load_average_at_start": os.getloadavg(),
    }
