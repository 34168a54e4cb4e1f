"""Hostile and unlucky requests against a real `unnoise serve`: every one must be answered with a status
that says whose fault it is (4xx: the client's), none may be lost or crash the server, and the server must
stay healthy and still generate afterwards.

The requests (each a named case, sent in order, then again from many clients at once): malformed JSON,
wrong types, out-of-range numbers, unknown samplers and schedulers, fields unnoise cannot honour,
oversized prompts and bodies, bad base64, images that are not images, PostScript (EPS), TIFF,
decompression bombs, mismatched masks, enormous sizes, unknown jobs and endpoints, wrong Host and Origin
headers, bodies that lie about their length. The baseline is the same server's answer to a plain request,
before and after: it must be 200 both times.

    .venv/bin/python benchmarks/hostile_inputs.py [--repeat 3] [--json benchmarks/results/hostile_inputs.json]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image
from servers import free_port, wait_healthy

RESULTS = Path(__file__).parent / "results"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def image_bytes(size=(32, 32), fmt="PNG", mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format=fmt)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's shape)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def png_text_bomb(chunks: int = 62) -> bytes:
    """An 8x8 PNG of about 84 KB whose `chunks` zTXt chunks each inflate to 1 MB (issue 31 item 1)."""
    header = struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" + b"\x00" * 24 * 8)
    text = _chunk(b"zTXt", b"parameters\x00\x00" + zlib.compress(b"A" * 999900, 9))
    body = _chunk(b"IHDR", header) + text * chunks + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_under_text_bombs(url: str, pid: int, clients: int = 40) -> dict:
    """The server's resident memory idle, at its peak while `clients` post the text bomb to png-info at
    once (sampled every 10 ms), and after."""
    import threading
    import time

    body = {"image": b64(png_text_bomb())}
    idle = resident_mb(pid)
    peak, sampling = [idle], threading.Event()

    def sample():
        while not sampling.is_set():
            peak.append(resident_mb(pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    with ThreadPoolExecutor(clients) as pool:
        statuses = list(pool.map(lambda _: httpx.post(f"{url}/sdapi/v1/png-info", json=body, timeout=60)
                                 .status_code, range(clients)))  # fmt: skip
    sampling.set()
    sampler.join()
    time.sleep(1.0)
    return {"clients": clients, "statuses": sorted(set(statuses)), "idle MB": round(idle),
            "peak MB": round(max(peak)), "after MB": round(resident_mb(pid)),
            "peak over idle MB": round(max(peak) - idle)}  # fmt: skip


def cases() -> list[tuple[str, str, str, dict]]:
    """(name, method, path, httpx keyword arguments)."""
    ok = b64(image_bytes())
    post = lambda body: {"json": body}  # noqa: E731
    return [
        (
            "malformed JSON",
            "POST",
            "/sdapi/v1/txt2img",
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
        ),
        ("JSON list body", "POST", "/sdapi/v1/txt2img", post([1, 2, 3])),
        ("steps as a string", "POST", "/sdapi/v1/txt2img", post({"prompt": "x", "steps": "many"})),
        ("steps 10^9", "POST", "/sdapi/v1/txt2img", post({"prompt": "x", "steps": 10**9})),
        ("negative steps", "POST", "/sdapi/v1/txt2img", post({"prompt": "x", "steps": -1})),
        (
            "cfg_scale NaN",
            "POST",
            "/sdapi/v1/txt2img",
            {
                "content": b'{"prompt": "x", "cfg_scale": NaN}',
                "headers": {"content-type": "application/json"},
            },
        ),
        ("seed 2^64", "POST", "/sdapi/v1/txt2img", post({"prompt": "x", "seed": 2**64})),
        ("batch 10^6", "POST", "/sdapi/v1/txt2img", post({"prompt": "x", "batch_size": 10**6})),
        ("unknown sampler", "POST", "/sdapi/v1/txt2img", post({"prompt": "x", "sampler_name": "Euler z"})),
        ("unknown scheduler", "POST", "/sdapi/v1/txt2img", post({"prompt": "x", "scheduler": "Bogus"})),
        ("enable_hr", "POST", "/sdapi/v1/txt2img", post({"prompt": "x", "enable_hr": True})),
        ("prompt of 1 MB", "POST", "/sdapi/v1/txt2img", post({"prompt": "x" * 2**20})),
        (
            "size 10^6 x 10^6",
            "POST",
            "/sdapi/v1/txt2img",
            post({"prompt": "x", "width": 10**6, "height": 10**6}),
        ),
        ("bad base64", "POST", "/sdapi/v1/img2img", post({"prompt": "x", "init_images": ["%%%"]})),
        ("not an image", "POST", "/sdapi/v1/img2img", post({"prompt": "x", "init_images": [b64(b"hello")]})),
        (
            "PostScript",
            "POST",
            "/sdapi/v1/img2img",
            post({"prompt": "x", "init_images": [b64(b"%!PS-Adobe-3.0 EPSF-3.0\n{ } loop\n")]}),
        ),
        (
            "TIFF",
            "POST",
            "/sdapi/v1/img2img",
            post({"prompt": "x", "init_images": [b64(image_bytes(fmt="TIFF"))]}),
        ),
        (
            "bomb 30000^2",
            "POST",
            "/sdapi/v1/img2img",
            post({"prompt": "x", "init_images": [b64(png_claiming(30000, 30000))]}),
        ),
        (
            "mask of another size",
            "POST",
            "/sdapi/v1/img2img",
            post({"prompt": "x", "init_images": [ok], "mask": b64(image_bytes((8, 8)))}),
        ),
        ("two init images", "POST", "/sdapi/v1/img2img", post({"prompt": "x", "init_images": [ok, ok]})),
        (
            "strength 2",
            "POST",
            "/sdapi/v1/img2img",
            post({"prompt": "x", "init_images": [ok], "denoising_strength": 2}),
        ),
        ("png-info of junk", "POST", "/sdapi/v1/png-info", post({"image": b64(b"junk")})),
        ("options: another model", "POST", "/sdapi/v1/options", post({"sd_model_checkpoint": "sdxl"})),
        ("options: a path", "POST", "/sdapi/v1/options", post({"sd_model_checkpoint": "../../../etc"})),
        ("options: a number", "POST", "/sdapi/v1/options", post({"sd_model_checkpoint": 7})),
        (
            "inpainting_fill 9",
            "POST",
            "/sdapi/v1/img2img",
            post({"prompt": "x", "init_images": [ok], "mask": ok, "inpainting_fill": 9}),
        ),
        ("OpenAI size 'huge'", "POST", "/v1/images/generations", post({"prompt": "x", "size": "huge"})),
        (
            "OpenAI url format",
            "POST",
            "/v1/images/generations",
            post({"prompt": "x", "response_format": "url"}),
        ),
        ("OpenAI n 10^6", "POST", "/v1/images/generations", post({"prompt": "x", "n": 10**6})),
        ("unknown job", "GET", "/jobs/0123456789abcdef", {}),
        ("unknown job events", "GET", "/jobs/../../etc/passwd/events", {}),
        ("delete unknown job", "DELETE", "/jobs/nope", {}),
        ("unknown endpoint", "GET", "/sdapi/v1/does-not-exist", {}),
        ("path traversal", "GET", "/static/../../pyproject.toml", {}),
        ("foreign Host", "GET", "/health", {"headers": {"host": "evil.example"}}),
        (
            "foreign Origin",
            "POST",
            "/sdapi/v1/txt2img",
            {"json": {"prompt": "x"}, "headers": {"origin": "http://evil.example"}},
        ),
        (
            "body over 24 MB",
            "POST",
            "/sdapi/v1/txt2img",
            {"content": b"{" + b" " * (25 * 2**20) + b"}", "headers": {"content-type": "application/json"}},
        ),
        (
            "Content-Length that is not a number",
            "RAW",
            "",
            {"raw": b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n{}"},
        ),
    ]


def send_raw(url: str, data: bytes) -> int | str:
    """Bytes a client library would refuse to write, straight onto a socket; the status the server sends."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(data)
        reply = s.recv(4096)
    status = reply.split(b" ", 2)[1:2]
    return int(status[0]) if status and status[0].isdigit() else "lost: no status line"


def send(url: str, case) -> tuple[str, int | str]:
    name, method, path, options = case
    if method == "RAW":
        try:
            return name, send_raw(url, options["raw"])
        except OSError as error:
            return name, f"lost: {type(error).__name__}"
    try:
        return name, httpx.request(method, url + path, timeout=60, **options).status_code
    except httpx.HTTPError as error:
        return name, f"lost: {type(error).__name__}"
    except Exception as error:  # the client library refused to send it (a header it will not write, say)
        return name, f"not sent: {type(error).__name__}"


def plain(url: str) -> int:
    return httpx.post(
        f"{url}/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 4}, timeout=60
    ).status_code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="rounds of every case from 8 clients at once")
    parser.add_argument("--json", default=str(RESULTS / "hostile_inputs.json"))
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "unnoise", "serve", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        wait_healthy(url)
        before = plain(url)
        plain(url)  # warm: the idle memory is that of a server that has generated
        bombs = memory_under_text_bombs(url, server.pid)
        all_cases = cases()
        answers = [send(url, case) for case in all_cases]  # one at a time, for the table
        with ThreadPoolExecutor(8) as pool:  # then all of them again, at once
            answers += list(pool.map(lambda case: send(url, case), all_cases * args.repeat))
        after = plain(url)
        health = httpx.get(f"{url}/health", timeout=10).json()
    finally:
        server.terminate()
        log = server.communicate(timeout=30)[1]
    statuses = [status for _, status in answers]
    count = {
        "tried": len(answers),
        "4xx": sum(isinstance(s, int) and 400 <= s < 500 for s in statuses),
        "5xx": sum(isinstance(s, int) and s >= 500 for s in statuses),
        "2xx": sum(isinstance(s, int) and 200 <= s < 300 for s in statuses),
        "lost": sum(isinstance(s, str) and s.startswith("lost") for s in statuses),
        "not sent by the client": sum(isinstance(s, str) and s.startswith("not sent") for s in statuses),
        "plain request before / after": f"{before} / {after}",
        "healthy after": health["status"] == "ok" and health["worker_alive"],
        "tracebacks in the server's log": log.count("Traceback"),
    }
    first = dict(answers[: len(all_cases)])
    lines = ["| case | status |", "|---|---:|", *(f"| {name} | {status} |" for name, status in first.items())]
    lines += ["", "| count | |", "|---|---:|", *(f"| {k} | {v} |" for k, v in count.items())]
    said = "40 clients post an 84 KB PNG of 62 zTXt chunks of 1 MB each to /sdapi/v1/png-info at once:"
    lines += ["", said, "", "| memory | |", "|---|---:|", *(f"| {k} | {v} |" for k, v in bombs.items())]
    print("\n".join(lines))
    Path(args.json).write_text(json.dumps({"cases": first, "counts": count, "text_bombs": bombs}, indent=1))
    Path(args.json).with_suffix(".md").write_text(
        "# Hostile inputs\n\n`.venv/bin/python benchmarks/hostile_inputs.py`\n\n" + "\n".join(lines) + "\n"
    )
    healthy = count["5xx"] == 0 and count["lost"] == 0 and count["healthy after"] and after == 200
    healthy = healthy and bombs["peak over idle MB"] <= 100 and bombs["statuses"] != [500]
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
