"""How many CPU threads a model should use now: one per core that other processes leave free.

PyTorch starts one thread per core. Beside another CPU-bound process its threads do not share the cores
but wait on each other, and a job runs many times slower (benchmarks/contention.py: 3.8x beside one
competitor on 2 cores, against 1.96x with one thread). `CpuShare` measures how many cores' worth of CPU
time other processes used, on the CPUs this process may run on, since it last looked (from /proc/stat's
per-CPU lines, less this process's own time) and leaves those cores to them. Where /proc/stat cannot be
read (not Linux) it answers every core.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

PROC_STAT = Path("/proc/stat")
MIN_WINDOW = 0.25  # seconds: a shorter interval since the last look is measured afresh, this long


@dataclass(frozen=True)
class CpuTimes:
    """A reading: wall time, the counted CPUs' busy seconds, and this process's CPU seconds."""

    wall: float
    busy: float
    own: float


def cpu_times(stat: Path = PROC_STAT, cpus: Collection[int] | None = None) -> CpuTimes | None:
    """Now's reading of the given CPUs (None: the machine's total line), or None where it cannot be read."""
    try:
        fields = [line.split() for line in stat.read_text().splitlines()]
        if cpus is None:
            rows = fields[:1]  # "cpu  user nice system idle iowait irq softirq steal ...": all CPUs
        else:
            wanted = {f"cpu{n}" for n in cpus}
            rows = [row for row in fields if row and row[0] in wanted]  # "cpu3 user nice ..."
        if not rows:
            return None
        jiffies = [[int(v) for v in row[1:9]] for row in rows]
    except (OSError, ValueError, IndexError):
        return None
    busy = sum(sum(j) - j[3] - j[4] for j in jiffies)  # all but idle and iowait
    ticks = os.sysconf("SC_CLK_TCK")
    own = os.times()
    return CpuTimes(time.monotonic(), busy / ticks, own.user + own.system)


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity: a container's cpuset, taskset), else all."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


class CpuShare:
    """`threads()`: this process's CPUs minus the CPUs' worth of time others used on them since the previous
    call (at least one thread, at most every CPU). Only the CPUs this process may run on are counted, so in
    a container pinned to its own cores the host's other tenants do not count. Call it between jobs, while
    this process is idle."""

    def __init__(self, cpus: Collection[int] | None = None, stat: Path = PROC_STAT):
        self.cpus = sorted(usable_cpus() if cpus is None else cpus)
        self.cores = len(self.cpus)
        self.stat = stat
        self.last = self.read()

    def read(self) -> CpuTimes | None:
        return cpu_times(self.stat, self.cpus)

    def others_busy(self) -> float | None:
        """Cores' worth of CPU the other processes used since the last reading (None: unknown)."""
        now = self.read()
        if now is None or self.last is None:
            return None
        if now.wall - self.last.wall < MIN_WINDOW:  # too short to tell: look for a moment
            self.last = now
            time.sleep(MIN_WINDOW)
            now = self.read()
            if now is None:
                return None
        busy = (now.busy - self.last.busy) - (now.own - self.last.own)
        elapsed = now.wall - self.last.wall
        self.last = now
        return max(0.0, busy / elapsed)

    def threads(self) -> int:
        others = self.others_busy()
        if others is None:
            return self.cores
        return max(1, min(self.cores, round(self.cores - others)))
