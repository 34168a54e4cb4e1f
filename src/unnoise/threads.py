"""How many CPU threads a model should use now: one per core that other processes leave free.

PyTorch starts one thread per core. Beside another CPU-bound process its threads do not share the cores
but wait on each other, and a job runs many times slower (benchmarks/contention.py: 3.8x beside one
competitor on 2 cores, against 1.96x with one thread). `CpuShare` measures how many cores' worth of CPU
time the rest of the machine used since it last looked (from /proc/stat, less this process's own time)
and leaves those cores to it. Where /proc/stat cannot be read (not Linux) it answers every core.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

PROC_STAT = Path("/proc/stat")
MIN_WINDOW = 0.25  # seconds: a shorter interval since the last look is measured afresh, this long


@dataclass(frozen=True)
class CpuTimes:
    """A reading: wall time, the machine's busy CPU seconds, and this process's CPU seconds."""

    wall: float
    machine_busy: float
    own: float


def cpu_times(stat: Path = PROC_STAT) -> CpuTimes | None:
    """Now's reading, or None where the machine's CPU times cannot be read."""
    try:
        fields = stat.read_text().split("\n", 1)[0].split()  # "cpu user nice system idle iowait irq ..."
        jiffies = [int(v) for v in fields[1:9]]
    except (OSError, ValueError, IndexError):
        return None
    idle = jiffies[3] + jiffies[4]  # idle + iowait
    ticks = os.sysconf("SC_CLK_TCK")
    own = os.times()
    return CpuTimes(time.monotonic(), (sum(jiffies) - idle) / ticks, own.user + own.system)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class CpuShare:
    """`threads()`: the cores minus the cores' worth of CPU others used since the previous call (at least
    one thread, at most every core). Call it between jobs, while this process is idle."""

    def __init__(self, cores: int | None = None, stat: Path = PROC_STAT):
        self.cores = cores or usable_cores()
        self.stat = stat
        self.last = cpu_times(stat)

    def others_busy(self) -> float | None:
        """Cores' worth of CPU the other processes used since the last reading (None: unknown)."""
        now = cpu_times(self.stat)
        if now is None or self.last is None:
            return None
        if now.wall - self.last.wall < MIN_WINDOW:  # too short to tell: look for a moment
            self.last = now
            time.sleep(MIN_WINDOW)
            now = cpu_times(self.stat)
            if now is None:
                return None
        busy = (now.machine_busy - self.last.machine_busy) - (now.own - self.last.own)
        elapsed = now.wall - self.last.wall
        self.last = now
        return max(0.0, busy / elapsed)

    def threads(self) -> int:
        others = self.others_busy()
        if others is None:
            return self.cores
        return max(1, min(self.cores, round(self.cores - others)))
