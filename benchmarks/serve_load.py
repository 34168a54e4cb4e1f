"""Load test of `unnoise serve`: N concurrent clients on loopback for T seconds, against the library.

Each client posts AUTOMATIC1111 txt2img requests (one image, `--steps` steps) in a loop. Every request
must be answered 200 or 429 (queue full, with Retry-After); anything else, or no answer, is a failure.
The baseline, measured in the same run, is the library itself: the same images generated back to back in
one process with no HTTP. Prints a table and writes it to benchmarks/results/serve_load.md (and .json).

    .venv/bin/python benchmarks/serve_load.py --clients 40 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from servers import free_port, wait_healthy

RESULTS = Path(__file__).parent / "results"


def library_rate(steps: int, seconds: float) -> float:
    """Images per second from pipe.generate in this process, one image per call."""
    import unnoise

    pipe = unnoise.load("shapes-32")
    pipe.generate("a red circle", steps=steps, seed=0)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        pipe.generate("a red circle", steps=steps, seed=count)
        count += 1
    return count / (time.perf_counter() - start)


async def client(url: str, steps: int, deadline: float, k: int, log: list) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        n = 0
        while time.perf_counter() < deadline:
            body = {"prompt": "a red circle", "steps": steps, "seed": k * 100_000 + n}
            start = time.perf_counter()
            try:
                reply = await http.post("/sdapi/v1/txt2img", json=body)
                status = reply.status_code
                wait = float(reply.headers.get("retry-after", 0)) if status == 429 else 0.0
            except httpx.HTTPError as error:
                status, wait = f"error: {type(error).__name__}", 0.0
            log.append((status, time.perf_counter() - start))
            n += 1
            if wait:
                await asyncio.sleep(min(wait, max(0.0, deadline - time.perf_counter())))


async def load(url: str, clients: int, seconds: float, steps: int) -> list:
    log: list = []
    deadline = time.perf_counter() + seconds
    await asyncio.gather(*(client(url, steps, deadline, k, log) for k in range(clients)))
    return log


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else (values or [float("nan")])[0]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--queue-size", type=int, default=16)
    parser.add_argument("--threads", default="auto", help="the server's --threads (default: auto, as serve)")
    parser.add_argument("--out", default=str(RESULTS / "serve_load"), help="writes OUT.md and OUT.json")
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "unnoise",
        "serve",
        "--port",
        str(port),
        "--queue-size",
        str(args.queue_size),
        "--threads",
        args.threads,
    ]
    server = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ.copy()
    )
    try:
        wait_healthy(url)
        started = time.perf_counter()
        log = asyncio.run(load(url, args.clients, args.seconds, args.steps))
        elapsed = time.perf_counter() - started
        health = httpx.get(f"{url}/health", timeout=10).json()
    finally:
        server.terminate()
        server.wait(timeout=30)
    baseline = library_rate(args.steps, min(args.seconds, 15.0))

    ok = [t for s, t in log if s == 200]
    busy = [t for s, t in log if s == 429]
    other_4xx = [s for s, _ in log if isinstance(s, int) and 400 <= s < 500 and s != 429]
    server_errors = [s for s, _ in log if isinstance(s, int) and s >= 500]
    lost = [s for s, _ in log if not isinstance(s, int)]  # no answer at all
    failed = [s for s, _ in log if s not in (200, 429)]
    served = len(ok) / elapsed
    rows = {
        "clients": args.clients,
        "seconds": round(elapsed, 1),
        "steps": args.steps,
        "requests": len(log),
        "answered 200": len(ok),
        "answered 429": len(busy),
        "other 4xx": len(other_4xx),
        "5xx": len(server_errors),
        "lost (no answer)": len(lost),
        "latency p50 (200s)": round(percentile(ok, 50), 3),
        "latency p90 (200s)": round(percentile(ok, 90), 3),
        "latency p99 (200s)": round(percentile(ok, 99), 3),
        "latency p50 (429s)": round(percentile(busy, 50), 4) if busy else None,
        "server images/s": round(served, 2),
        "library images/s (same steps, no HTTP)": round(baseline, 2),
        "server / library": round(served / baseline, 3),
        "healthy after": health["status"] == "ok" and health["worker_alive"],
    }
    flags = f"--clients {args.clients} --seconds {args.seconds:g} --steps {args.steps}"
    flags += f" --queue-size {args.queue_size} --threads {args.threads}"
    command = f"`.venv/bin/python benchmarks/serve_load.py {flags}`"
    lines = ["# Serve under load", "", command + f" on {os.cpu_count()} cores.", "", "| | |", "|---|---:|"]
    lines += [f"| {name} | {value} |" for name, value in rows.items()]
    print("\n".join(lines))
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    Path(args.out + ".json").write_text(json.dumps(rows, indent=1))
    return 0 if not failed and rows["healthy after"] else 1


if __name__ == "__main__":
    sys.exit(main())
