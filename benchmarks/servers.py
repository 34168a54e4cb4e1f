"""What the server benchmarks share: a free loopback port, and waiting until a started server answers."""

from __future__ import annotations

import socket
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, seconds: float = 120.0) -> None:
    """Return once GET url/health answers 200 (the model is loaded); raise after `seconds`."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the server at {url} did not answer /health within {seconds:g} s")
