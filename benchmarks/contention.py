"""Generation while another CPU-bound process runs: PyTorch's default (one thread per core) against
`--threads 1` and `--threads auto` (the cores other processes leave free), each alone and beside a
competitor (a second torch process multiplying matrices with its own default thread count, as a training
run or another server would). Fresh processes; the median seconds per 10-step image of 5 images after a
warm-up; prints a table with each case's ratio to the default alone, and writes
benchmarks/results/contention.md.

    .venv/bin/python benchmarks/contention.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

GENERATE = textwrap.dedent(
    """
    import statistics, sys, time, torch, unnoise
    from unnoise.threads import CpuShare
    if {threads!r} == "auto":
        torch.set_num_threads(CpuShare().threads())
    elif {threads!r}:
        torch.set_num_threads({threads!r})
    pipe = unnoise.load("shapes-32")
    pipe.generate("a red circle", steps=10, seed=0)
    times = []
    for k in range(5):
        start = time.perf_counter()
        pipe.generate("a red circle", steps=10, seed=k)
        times.append(time.perf_counter() - start)
    print(statistics.median(times), torch.get_num_threads())
    """
)
COMPETITOR = "import torch\na = torch.randn(1024, 1024)\nwhile True:\n    a = torch.tanh(a @ a)\n"


def seconds_per_image(threads: int | str, competing: bool) -> tuple[float, int]:
    competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR]) if competing else None
    try:
        if competitor is not None:
            time.sleep(2)  # let it start spinning
        out = subprocess.run(
            [sys.executable, "-c", GENERATE.format(threads=threads)],
            capture_output=True,
            text=True,
            check=True,
            timeout=900,
        )
        median, used = out.stdout.split()[-2:]
        return float(median), int(used)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()


def main() -> None:
    cases = [(0, False), (1, False), ("auto", False), (0, True), (1, True), ("auto", True)]
    rows = []
    for threads, competing in cases:
        value, used = seconds_per_image(threads, competing)
        label = f"{f'--threads {threads}' if threads else 'default'} ({used} thread{'s' * (used > 1)})"
        rows.append((label, "yes" if competing else "no", value))
    base = rows[0][2]
    lines = [
        "# Generation beside a competing process",
        "",
        f"`.venv/bin/python benchmarks/contention.py` on {os.cpu_count()} cores: seconds per 10-step image of"
        " `shapes-32` (median of 5), the competitor a second torch process multiplying 1024x1024 matrices"
        " with its default threads.",
        "",
        "| threads | competitor | s / image | vs default alone |",
        "|---|---|---:|---:|",
        *(f"| {label} | {rival} | {value:.3f} | {value / base:.2f}x |" for label, rival, value in rows),
    ]
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "contention.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
