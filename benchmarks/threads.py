"""Why `unnoise serve` keeps every tensor op on its worker thread: one image generated on the main thread,
on a second thread after the main thread has run the model, and on a thread that loaded the model itself
(as the server does). Fresh processes, the median of 5 images each; prints a table and the ratio.

    .venv/bin/python benchmarks/threads.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import textwrap

IN_A_THREAD = "t = threading.Thread(target=run); t.start(); t.join()"
CASES = {
    "main thread (load and generate)": "run()",
    "second thread, after the main thread ran the model": "run(); " + IN_A_THREAD,
    "one thread that loads and generates (the server)": IN_A_THREAD,
}

SCRIPT = textwrap.dedent(
    """
    import threading, time, statistics, unnoise
    pipe = None
    def run():
        global pipe
        pipe = pipe or unnoise.load("shapes-32")
        times = []
        for k in range(6):
            start = time.perf_counter()
            pipe.generate("a red circle", steps=10, seed=k)
            times.append(time.perf_counter() - start)
        print(statistics.median(times[1:]))
    {case}
    """
)


def seconds(case: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(case=case)], capture_output=True, text=True, check=True
    )
    return float(out.stdout.split()[-1])  # the last run's median


def main() -> None:
    results = {name: statistics.median(seconds(case) for _ in range(3)) for name, case in CASES.items()}
    base = results["main thread (load and generate)"]
    print(f"{'where the model runs':<52} {'s / image':>9} {'vs main':>8}")
    for name, value in results.items():
        print(f"{name:<52} {value:>9.3f} {value / base:>7.2f}x")


if __name__ == "__main__":
    main()
