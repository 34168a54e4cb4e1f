"""`unnoise serve` as a user starts it: its own process, its own signals, its own environment."""

import os
import signal
import subprocess
import sys
import time

import httpx

from unnoise.cli import build_parser

from .test_server import free_port, wait_until


def test_the_api_key_can_come_from_the_environment_so_ps_does_not_show_it(monkeypatch):
    """Issue 12: `--api-key KEY` is visible to every user in `ps`; UNNOISE_API_KEY is not."""
    monkeypatch.setenv("UNNOISE_API_KEY", "s3cret")
    assert build_parser().parse_args(["serve"]).api_key == "s3cret"
    monkeypatch.delenv("UNNOISE_API_KEY")
    assert build_parser().parse_args(["serve"]).api_key is None


def test_sigterm_stops_the_server_promptly_with_work_queued():
    """Issue 12: SIGTERM ran the whole queue first (83 s); now every job is cancelled and it exits."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "unnoise", "serve", "--port", str(port), "--threads", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(healthy, timeout=120), "the server did not start"
        jobs = [httpx.post(f"{url}/jobs", json={"prompt": "x", "steps": 200}, timeout=10) for _ in range(4)]
        assert all(job.status_code == 202 for job in jobs), [job.text for job in jobs]
        assert wait_until(lambda: httpx.get(f"{url}/health", timeout=5).json()["busy"], timeout=30)
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        assert time.monotonic() - started < 10  # four 200-step jobs would take far longer
        output = server.stdout.read()
        # uvicorn shuts down gracefully, then re-raises the signal so the exit status says SIGTERM
        assert server.returncode in (0, -signal.SIGTERM), output
        assert "Application shutdown complete" in output, output
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_a_planned_stop_answers_waiting_clients_503_and_watchers_a_final_event_and_logs_no_error():
    """Issue 31 item 5: SIGTERM answered a waiting client 500 and logged a CancelledError traceback; an SSE
    watcher was cut off. Now: 503 with Retry-After, a final `cancelled` event that says why, no error."""
    import json
    import threading

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "unnoise", "serve", "--port", str(port), "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    answers, events = [], []
    try:
        assert wait_until(lambda: server_is_up(url), timeout=120), "the server did not start"
        job = httpx.post(f"{url}/jobs", json={"prompt": "x", "steps": 200}, timeout=10).json()

        def watch() -> None:
            headers = {"X-Job-Token": job["token"]}
            with httpx.stream("GET", f"{url}{job['events']}", headers=headers, timeout=60) as stream:
                events.append(f"status {stream.status_code}")
                for line in stream.iter_lines():
                    if line.startswith(("event:", "data:")):
                        events.append(line)

        def wait_for_images() -> None:
            body = {"prompt": "y", "steps": 200}
            answers.append(httpx.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=60))

        threads = [threading.Thread(target=watch), threading.Thread(target=wait_for_images)]
        for thread in threads:
            thread.start()
        assert wait_until(lambda: httpx.get(f"{url}/health", timeout=5).json()["busy"], timeout=30)
        assert wait_until(lambda: len(events) > 1, timeout=30), events  # the watcher is connected
        server.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=30)
        server.wait(timeout=30)
        output = server.stdout.read()
        (answer,) = answers
        assert answer.status_code == 503 and answer.headers["Retry-After"].isdigit(), answer.text
        assert "stopping" in answer.json()["error"]
        assert events[0] == "status 200" and events[-2] == "event: cancelled", events[-4:]
        assert "stopping" in json.loads(events[-1].removeprefix("data:"))["error"]
        assert "Traceback" not in output and " ERROR" not in output, output
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def server_is_up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_serve_takes_a_log_level():
    assert build_parser().parse_args(["serve"]).log_level == "info"
    assert build_parser().parse_args(["serve", "--log-level", "warning"]).log_level == "warning"
