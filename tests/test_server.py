"""The HTTP server, run for real (uvicorn on a loopback port) and spoken to by real clients: httpx, the
official `openai` package, and server-sent events read off the wire."""

import base64
import io
import json
import socket
import struct
import threading
import time
import zlib

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

import unnoise
from tests.conftest import weights_of
from unnoise.errors import UnnoiseError
from unnoise.server.app import create_app, serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real uvicorn server on a thread, for one app."""

    def __init__(self, app, port: int):
        self.port = port
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def pipe():
    return unnoise.load("shapes-32")


@pytest.fixture(scope="module")
def server(pipe):
    port = free_port()
    running = Server(create_app(pipe, port=port, queue_size=4), port)
    yield running
    running.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def png_of(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def b64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def wait_until(predicate, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def submit(client, body: dict) -> tuple[str, dict[str, str]]:
    """POST /jobs: the job's id and the header that shows its owner's token."""
    reply = client.post("/jobs", json=body)
    assert reply.status_code == 202, reply.text
    return reply.json()["id"], {"X-Job-Token": reply.json()["token"]}


# --- AUTOMATIC1111 ---------------------------------------------------------------------------------------


def test_txt2img_answers_like_automatic1111_with_the_library_s_images(client, pipe):
    body = {"prompt": "a red circle", "steps": 5, "seed": 11, "batch_size": 2, "sampler_name": "DPM++ 2M"}
    reply = client.post("/sdapi/v1/txt2img", json=body)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    images = [png_of(x) for x in data["images"]]
    assert len(images) == 2 and images[0].size == (32, 32)
    assert json.loads(data["info"])["all_seeds"] == [11, 12]
    assert (
        images[1]
        .info["parameters"]
        .startswith("a red circle\nSteps: 5, Sampler: DPM++ 2M, Schedule type: Karras")
    )
    direct = pipe.generate("a red circle", steps=5, seed=11, num_images=2)
    assert all(
        np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b))
        for a, b in zip(images, direct, strict=True)
    )


def test_img2img_with_a_mask_inpaints_and_keeps_the_rest(client):
    rng = np.random.default_rng(0)
    source = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    mask = Image.new("L", (48, 40), 0)
    mask.paste(255, (8, 8, 24, 24))
    body = {"prompt": "a blue square", "steps": 4, "seed": 1, "init_images": [b64_png(source)],
            "mask": "data:image/png;base64," + b64_png(mask), "denoising_strength": 1.0}  # fmt: skip
    reply = client.post("/sdapi/v1/img2img", json=body)
    assert reply.status_code == 200, reply.text
    out = np.asarray(png_of(reply.json()["images"][0]).convert("RGB"))
    keep = np.asarray(mask) == 0
    assert out.shape == (40, 48, 3) and np.array_equal(out[keep], np.asarray(source)[keep])
    plain = client.post("/sdapi/v1/img2img", json={**body, "mask": None, "denoising_strength": 0.0})
    assert np.array_equal(np.asarray(png_of(plain.json()["images"][0]).convert("RGB")), np.asarray(source))


def test_samplers_and_models_are_listed(client):
    samplers = client.get("/sdapi/v1/samplers").json()
    names = {s["name"] for s in samplers}
    assert {"Euler a", "DPM++ 2M", "UniPC"} <= names
    model = client.get("/sdapi/v1/sd-models").json()[0]
    assert model["model_name"] == "shapes-32" and len(model["hash"]) == 10  # issue 13: webuiapi reads it
    assert model["title"] == f"shapes-32 [{model['hash']}]"
    assert client.get("/sdapi/v1/progress").json()["state"]["sampling_steps"] >= 0


# --- OpenAI ----------------------------------------------------------------------------------------------


def test_the_official_openai_client_gets_images(server):
    import openai

    api = openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-needed-on-loopback", max_retries=0)
    result = api.images.generate(prompt="a green triangle", n=2, size="32x32", response_format="b64_json")
    assert len(result.data) == 2 and png_of(result.data[0].b64_json).size == (32, 32)
    big = api.images.generate(prompt="x", size="1024x1024")  # the client's usual size: the largest we make
    assert png_of(big.data[0].b64_json).size == (64, 64)
    for size in ("large", "1_000x1", " 8x8", "+8x+8"):  # issue 31: int() took the middle three
        with pytest.raises(openai.BadRequestError, match="is not WIDTHxHEIGHT"):
            api.images.generate(prompt="x", size=size)


# --- jobs ------------------------------------------------------------------------------------------------


def read_events(response) -> list[tuple[str, dict]]:
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((name, json.loads(line.removeprefix("data: "))))
            if name in ("done", "failed", "cancelled"):
                break
    return events


def test_a_job_streams_previews_to_several_watchers_then_its_images(client, server):
    job_id, owner = submit(client, {"prompt": "two green circles", "steps": 12, "seed": 3})
    streams = [[], []]

    def watch(k):
        with httpx.stream("GET", f"{server.url}/jobs/{job_id}/events", headers=owner, timeout=60) as r:
            streams[k] = read_events(r)

    watchers = [threading.Thread(target=watch, args=(k,)) for k in range(2)]
    for w in watchers:
        w.start()
    for w in watchers:
        w.join(timeout=60)
    for events in streams:
        assert events[-1][0] == "done" and len(events[-1][1]["images"]) == 1
    progress = [e for name, e in streams[0] if name == "progress"]
    assert progress and any(e["preview"] for e in progress)
    assert png_of(next(e["preview"] for e in progress if e["preview"])).size == (32, 32)
    final = client.get(f"/jobs/{job_id}", headers=owner).json()
    assert final["state"] == "done" and final["progress"] == 1.0
    assert final["parameters"][0].startswith("two green circles")


def test_cancel_and_disconnect_mid_job_leave_the_worker_ready(client, server):
    job_id, owner = submit(client, {"prompt": "a red circle", "steps": 200})
    with httpx.stream("GET", f"{server.url}/jobs/{job_id}/events", headers=owner, timeout=60) as r:
        next(r.iter_lines())  # a watcher that goes away mid-job
    assert wait_until(lambda: client.get(f"/jobs/{job_id}", headers=owner).json()["step"] > 0)
    assert client.delete(f"/jobs/{job_id}", headers=owner).status_code == 200
    assert wait_until(lambda: client.get(f"/jobs/{job_id}", headers=owner).json()["state"] == "cancelled")
    after = client.post("/sdapi/v1/txt2img", json={"prompt": "a blue square", "steps": 3})
    assert after.status_code == 200 and len(after.json()["images"]) == 1
    health = client.get("/health").json()
    assert health["worker_alive"] and not health["busy"]


def interrupted(client, server, path: str, body: dict, action: str = "interrupt") -> httpx.Response:
    """The answer to a long request interrupted (through the real webuiapi client) once it has begun."""
    import webuiapi

    result = {}

    def slow():
        result["reply"] = httpx.post(f"{server.url}{path}", json=body, timeout=60)

    thread = threading.Thread(target=slow)
    thread.start()
    assert wait_until(lambda: client.get("/sdapi/v1/progress").json()["state"]["sampling_step"] > 0)
    assert client.get("/sdapi/v1/progress").json()["current_image"]  # the preview of x0_hat
    assert getattr(webuiapi.WebUIApi(host="127.0.0.1", port=server.port), action)() == {}
    thread.join(timeout=60)
    assert wait_until(lambda: not client.get("/health").json()["busy"])
    return result["reply"]


@pytest.mark.parametrize("action", ["interrupt", "skip"])
def test_interrupt_and_skip_stop_the_running_request(client, server, action):
    """Issue 13: /sdapi/v1/skip was a 404. A batch here is one sampling run, so skip stops it as interrupt
    does; both are called through the real webuiapi client."""
    reply = interrupted(client, server, "/sdapi/v1/txt2img", {"prompt": "x", "steps": 200, "seed": 9}, action)
    # issue 13: as in AUTOMATIC1111, the interrupted request returns the image as it is (it was a 409)
    assert reply.status_code == 200, reply.text
    image, info = png_of(reply.json()["images"][0]), json.loads(reply.json()["info"])
    assert image.size == (32, 32)
    assert "at step" in info["comments"]["interrupted"]
    # with its parameters text (it had none), which says where it stopped
    assert info["infotexts"][0] == image.info["parameters"]
    assert (
        image.info["parameters"].startswith("x\nSteps: 200, Sampler: DPM++ 2M")
        and "Seed: 9" in info["infotexts"][0]
    )
    assert "Interrupted: step " in info["infotexts"][0]


def test_an_interrupted_edit_is_finished_as_a_complete_one(client, server):
    """Interrupted img2img and inpainting answered the model's 32x32 x0 estimate: now resized back to the
    answer's size, composited into the input (every kept pixel the input's), with parameters."""
    rng = np.random.default_rng(5)
    source = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    mask = Image.new("L", (48, 40), 0)
    mask.paste(255, (8, 8, 24, 24))
    body = {"prompt": "a blue square", "steps": 200, "seed": 1, "init_images": [b64_png(source)],
            "mask": b64_png(mask), "denoising_strength": 1.0}  # fmt: skip
    reply = interrupted(client, server, "/sdapi/v1/img2img", body)
    assert reply.status_code == 200, reply.text
    image, info = png_of(reply.json()["images"][0]), json.loads(reply.json()["info"])
    out, keep = np.asarray(image.convert("RGB")), np.asarray(mask) == 0
    assert image.size == (48, 40) and np.array_equal(out[keep], np.asarray(source)[keep])
    assert "RePaint jump: 2" in info["infotexts"][0] and "Interrupted: step" in image.info["parameters"]
    plain = {**body, "mask": None, "denoising_strength": 0.9, "width": 48, "height": 32}
    reply = interrupted(client, server, "/sdapi/v1/img2img", plain)
    image, info = png_of(reply.json()["images"][0]), json.loads(reply.json()["info"])
    assert image.size == (48, 32) and "Denoising strength: 0.9" in image.info["parameters"]
    assert "Interrupted: step" in info["infotexts"][0]


def test_a_full_queue_answers_429_with_retry_after(pipe):
    port = free_port()
    running = Server(create_app(pipe, port=port, queue_size=1), port)
    try:
        with httpx.Client(base_url=running.url, timeout=30) as c:
            first, first_owner = submit(c, {"prompt": "x", "steps": 200})
            assert wait_until(
                lambda: c.get(f"/jobs/{first}", headers=first_owner).json()["state"] == "running"
            )
            second = c.post("/jobs", json={"prompt": "x", "steps": 200})
            third = c.post("/jobs", json={"prompt": "x", "steps": 200})
            assert second.status_code == 202 and third.status_code == 429
            assert int(third.headers["retry-after"]) >= 1 and "queue is full" in third.json()["error"]
            c.delete(f"/jobs/{first}", headers=first_owner)
            c.delete(f"/jobs/{second.json()['id']}", headers={"X-Job-Token": second.json()["token"]})
            assert wait_until(lambda: not c.get("/health").json()["busy"])
    finally:
        running.stop()


# --- limits and safety ------------------------------------------------------------------------------------


def bomb_png(width: int, height: int) -> str:
    """A PNG header claiming width x height pixels, with almost no data: refused before decoding."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    raw = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )
    return base64.b64encode(raw).decode()


EPS = base64.b64encode(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n{ } loop\n").decode()


def _tiff() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="TIFF")
    return base64.b64encode(buffer.getvalue()).decode()


TIFF = _tiff()


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"prompt": "x", "steps": 500}, 422, "steps"),
        ({"prompt": "x", "sampler_name": "Euler b"}, 422, "unknown sampler 'Euler b'"),
        ({"prompt": "x", "batch_size": 8, "n_iter": 2}, 422, "at most 8 images per request"),
        ({"prompt": "x" * 3000}, 422, "prompt"),
        ({"prompt": "x", "init_images": ["not base64!"]}, 422, "init image is not valid base64"),
        ({"prompt": "x", "init_images": [base64.b64encode(b"hello").decode()]}, 422, "not a readable image"),
        ({"prompt": "x", "init_images": [bomb_png(5000, 5000)]}, 413, "5000x5000 pixels"),
        ({"prompt": "x", "init_images": [bomb_png(30000, 30000)]}, 413, "too many pixels"),
        ({"prompt": "x", "seed": "abc"}, 422, "seed"),
        # issue 12: PostScript would run in Ghostscript where it is installed; only plain formats decode
        ({"prompt": "x", "init_images": [EPS]}, 422, "accepted: PNG, JPEG, WEBP, BMP, GIF"),
        ({"prompt": "x", "init_images": [TIFF]}, 422, "accepted: PNG, JPEG, WEBP, BMP, GIF"),
    ],
)
def test_bad_requests_get_a_4xx_that_says_why(client, body, status, message):
    reply = client.post("/jobs", json=body)
    assert reply.status_code == status, reply.text
    assert message in reply.json()["error"]
    assert "Traceback" not in reply.text


def test_mask_size_body_size_and_unknown_jobs(client):
    image = b64_png(Image.new("RGB", (32, 32)))
    reply = client.post(
        "/jobs", json={"prompt": "x", "init_images": [image], "mask": b64_png(Image.new("L", (8, 8)))}
    )
    assert reply.status_code == 422 and "the mask is 8x8 but the image is 32x32" in reply.json()["error"]
    huge = client.post(
        "/jobs", content=b"{" + b" " * (25 * 2**20) + b"}", headers={"content-type": "application/json"}
    )
    assert huge.status_code == 413
    assert client.get("/jobs/nope").status_code == 404
    assert (
        client.post(
            "/sdapi/v1/txt2img", content=b"{oops", headers={"content-type": "application/json"}
        ).status_code
        == 422
    )


def test_other_sites_and_other_host_names_are_refused(client):
    evil = client.post("/jobs", json={"prompt": "x"}, headers={"Origin": "http://evil.example"})
    assert evil.status_code == 403 and "not allowed" in evil.json()["error"]
    rebound = client.get("/health", headers={"Host": "evil.example"})
    assert rebound.status_code == 403
    same = client.get(
        "/health", headers={"Origin": client.base_url.scheme + "://" + client.base_url.netloc.decode()}
    )
    assert same.status_code == 200
    assert "access-control-allow-origin" not in {k.lower() for k in same.headers}


def test_bound_to_every_interface_it_answers_to_ip_addresses_and_allowed_names_only(pipe):
    port = free_port()
    app = create_app(pipe, host="0.0.0.0", port=port, api_key="k", allowed_hosts=("gpu-box.lan",))
    running = Server(app, port)
    key = {"Authorization": "Bearer k"}
    try:
        with httpx.Client(base_url=running.url, timeout=30) as c:
            for host in (f"192.168.1.5:{port}", f"gpu-box.lan:{port}", f"[fe80::1]:{port}"):
                assert c.get("/sdapi/v1/samplers", headers={**key, "Host": host}).status_code == 200, host
            assert (
                c.get("/sdapi/v1/samplers", headers={**key, "Host": f"evil.example:{port}"}).status_code
                == 403
            )
            same = {**key, "Host": f"192.168.1.5:{port}", "Origin": f"http://192.168.1.5:{port}"}
            assert c.get("/health", headers=same).status_code == 200
            other = {**same, "Origin": f"http://192.168.1.6:{port}"}
            assert c.get("/health", headers=other).status_code == 403
    finally:
        running.stop()


def test_an_api_key_guards_everything_but_the_page(pipe):
    port = free_port()
    running = Server(create_app(pipe, port=port, api_key="s3cret"), port)
    try:
        with httpx.Client(base_url=running.url, timeout=30) as c:
            assert c.get("/").status_code == 200
            assert c.get("/sdapi/v1/samplers").status_code == 401
            assert c.get("/sdapi/v1/samplers", headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert c.get("/sdapi/v1/samplers", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        # issue 13: AUTOMATIC1111's --api-auth is HTTP Basic, which webuiapi's set_auth sends: the key is the
        # password, any user name
        import openai
        import webuiapi

        api = webuiapi.WebUIApi(host="127.0.0.1", port=running.port)
        api.set_auth("user", "s3cret")
        assert api.txt2img(prompt="a red circle", steps=2, width=32, height=32).image.size == (32, 32)
        api.set_auth("user", "wrong")
        with pytest.raises(RuntimeError, match="401"):
            api.png_info(Image.new("RGB", (8, 8)))
        for broken in ("Basic !!!", "Basic " + base64.b64encode(b"no-colon").decode(), "s3cret", "Bearer"):
            assert (
                httpx.get(f"{running.url}/sdapi/v1/samplers", headers={"Authorization": broken}).status_code
                == 401
            )
        keyed = openai.OpenAI(base_url=f"{running.url}/v1", api_key="s3cret", max_retries=0)
        assert keyed.models.retrieve("shapes-32").id == "shapes-32"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{running.url}/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        running.stop()


def test_serving_beyond_loopback_needs_an_api_key():
    with pytest.raises(UnnoiseError, match="pass --api-key"):
        serve("shapes-32", host="0.0.0.0", port=free_port(), api_key=None, queue_size=4)


def test_the_openapi_schema_lists_the_endpoints(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/v1/images/generations", "/jobs"} <= set(paths)


def test_forty_clients_at_once_are_all_answered_200_or_429_and_the_server_stays_healthy(pipe):
    """A bounded load test (the benchmark, benchmarks/serve_load.py, runs it longer and reports latency)."""
    import asyncio

    port = free_port()
    running = Server(create_app(pipe, port=port, queue_size=4), port)
    statuses = []

    async def one_client(k):
        async with httpx.AsyncClient(base_url=running.url, timeout=60) as http:
            for n in range(3):
                reply = await http.post(
                    "/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "seed": k * 10 + n}
                )
                statuses.append(reply.status_code)

    async def everyone():
        await asyncio.gather(*(one_client(k) for k in range(40)))

    try:
        asyncio.run(everyone())
        assert len(statuses) == 120 and set(statuses) <= {200, 429}
        assert statuses.count(200) >= 5 and statuses.count(429) >= 1  # some served, the rest told to wait
        health = httpx.get(f"{running.url}/health", timeout=10).json()
        assert health["worker_alive"] and health["queued"] == 0
    finally:
        running.stop()


def test_a_bug_is_a_500_logged_for_the_operator_and_a_users_mistake_a_422(pipe, caplog):
    """Issue 12: every exception inside the library was a 422 with its message, and nothing was logged."""

    class Faulty:
        def __init__(self, error):
            self.error, self.name, self.resolution = error, "faulty", pipe.resolution
            self.default_guidance = pipe.default_guidance
            self.default_bind_attributes = pipe.default_bind_attributes

        def size_for(self, width, height):
            return self.resolution, self.resolution

        def with_schedule(self, settings):
            return settings

        def generate(self, *args, **kwargs):
            raise self.error

    for error, status in ((RuntimeError("tensor shapes broke"), 500), (UnnoiseError("steps too many"), 422)):
        port = free_port()
        running = Server(create_app(lambda error=error: Faulty(error), port=port, queue_size=2), port)
        # the access line is written after the answer is sent: the capture stays at ERROR until the server
        # has stopped, so a 4xx line (WARNING) logged a moment after the answer is not caught at INFO
        with caplog.at_level("ERROR", logger="unnoise.server"):
            caplog.clear()
            try:
                answer = httpx.post(f"{running.url}/sdapi/v1/txt2img", json={"prompt": "x"}, timeout=60)
            finally:
                running.stop()
        assert answer.status_code == status, answer.text
        if status == 500:
            assert "tensor shapes broke" not in answer.text and "internal error" in answer.json()["error"]
            assert "tensor shapes broke" in caplog.text and "Traceback" in caplog.text
            assert any(  # and its access line, at ERROR
                r.name == "unnoise.server.access" and r.getMessage().startswith("POST /sdapi/v1/txt2img 500")
                for r in caplog.records
            )
        else:
            assert answer.json()["error"] == "steps too many" and not caplog.text


def test_serve_refuses_a_port_out_of_range_and_an_unbounded_queue():
    with pytest.raises(UnnoiseError, match=r"--port must be in 1\.\.65535, got 70000"):
        serve("shapes-32", host="127.0.0.1", port=70000, api_key=None, queue_size=4)
    with pytest.raises(UnnoiseError, match="--queue-size must be at least 1, got 0"):
        serve("shapes-32", host="127.0.0.1", port=7860, api_key=None, queue_size=0)
    with pytest.raises(UnnoiseError, match="--models-dir '/no/such/folder' is not a folder"):
        serve(
            "shapes-32",
            host="127.0.0.1",
            port=7860,
            api_key=None,
            queue_size=4,
            models_dirs=("/no/such/folder",),
        )
    with pytest.raises(UnnoiseError, match="no model 'no-such-model'"):
        serve("no-such-model", host="127.0.0.1", port=7860, api_key=None, queue_size=4)
    with pytest.raises(
        UnnoiseError, match="--log-level must be one of debug, info, warning, error, critical"
    ):
        serve("shapes-32", host="127.0.0.1", port=7860, api_key=None, queue_size=4, log_level="loud")


# --- issue 13: what AUTOMATIC1111's and OpenAI's clients expect ------------------------------------------


def test_a1111_fields_are_honoured_or_refused_by_name(client):
    base = {"prompt": "a red circle", "steps": 3, "seed": 2**32 - 1}  # A1111's largest seed
    reply = client.post("/sdapi/v1/txt2img", json={**base, "sampler_index": "Euler a", "scheduler": "Karras"})
    assert reply.status_code == 200, reply.text
    assert "Sampler: Euler a" in png_of(reply.json()["images"][0]).info["parameters"]
    assert json.loads(reply.json()["info"])["seed"] == 2**32 - 1
    # the sampler fields are options of the samplers that take them (they were ignored)
    for extra, written in (
        ({"sampler_name": "DDIM", "eta": 0.5}, "Eta: 0.5"),
        ({"sampler_name": "Euler a", "eta": 0.5, "s_noise": 0.9}, "Eta: 0.5, S noise: 0.9"),
        (
            {"sampler_name": "Heun", "s_churn": 1, "s_tmin": 0.1, "s_tmax": 0, "s_noise": 1},
            "S churn: 1, S tmin: 0.1",
        ),
    ):
        honoured = client.post("/sdapi/v1/txt2img", json={**base, **extra})
        assert honoured.status_code == 200, (extra, honoured.text)
        assert written in json.loads(honoured.json()["info"])["infotexts"][0], extra
    plain = client.post(
        "/sdapi/v1/txt2img", json={**base, "eta": 1.0, "s_churn": 0, "s_tmax": 0, "s_noise": 1}
    )
    assert (
        plain.status_code == 200
        and plain.json()["images"] == client.post("/sdapi/v1/txt2img", json=base).json()["images"]
    )  # the values that ask for nothing (webuiapi's defaults) change nothing
    image = b64_png(Image.new("RGB", (32, 32)))
    for path, extra, named in (
        ("txt2img", {"enable_hr": True}, "enable_hr"),
        ("txt2img", {"restore_faces": True}, "restore_faces"),
        ("txt2img", {"tiling": True}, "tiling"),
        ("txt2img", {"styles": ["cinematic"]}, "styles"),
        ("txt2img", {"override_settings": {"CLIP_stop_at_last_layers": 2}}, "override_settings"),
        ("txt2img", {"script_name": "x/y/z plot"}, "script_name"),
        ("txt2img", {"alwayson_scripts": {"ADetailer": {"args": [True]}}}, "alwayson_scripts"),
        ("txt2img", {"scheduler": "Exponential"}, "Exponential"),
        ("txt2img", {"seed": 2**32}, "seed"),
        ("txt2img", {"seed_resize_from_h": 64}, "seed_resize_from_h"),
        ("txt2img", {"seed_resize_from_w": 64}, "seed_resize_from_w"),
        ("txt2img", {"eta": 0.5}, "eta=0.5"),  # DPM++ 2M takes no eta
        ("txt2img", {"s_churn": 1}, "s_churn=1"),
        ("txt2img", {"s_noise": 0.5}, "s_noise=0.5"),
        ("txt2img", {"s_tmin": 0.5}, "s_tmin=0.5"),
        ("txt2img", {"s_tmax": 5}, "s_tmax=5"),
        ("txt2img", {"sampler_name": "Euler a", "s_churn": 1}, "s_churn=1"),
        ("img2img", {"init_images": [image], "image_cfg_scale": 2}, "image_cfg_scale"),
        ("img2img", {"init_images": [image], "initial_noise_multiplier": 0.5}, "initial_noise_multiplier"),
        ("img2img", {"init_images": [image], "resize_mode": 3}, "resize_mode"),
    ):
        refused = client.post(f"/sdapi/v1/{path}", json={**base, **extra})
        assert refused.status_code == 422 and named in refused.json()["error"], (extra, refused.text)
    defaults = {
        "init_images": [image], "image_cfg_scale": 1.5, "initial_noise_multiplier": 1, "resize_mode": 0,
        "seed_resize_from_h": 0, "seed_resize_from_w": -1, "restore_faces": False, "tiling": False,
    }  # fmt: skip
    assert client.post("/sdapi/v1/img2img", json={**base, **defaults}).status_code == 200


def test_an_inverted_mask_regenerates_the_black_part(client):
    rng = np.random.default_rng(1)
    source = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    body = {"prompt": "x", "steps": 3, "seed": 1, "init_images": [b64_png(source)], "mask": b64_png(mask),
            "denoising_strength": 1.0, "inpainting_mask_invert": 1}  # fmt: skip
    reply = client.post("/sdapi/v1/img2img", json=body)
    assert reply.status_code == 200, reply.text
    out, src = np.asarray(png_of(reply.json()["images"][0]).convert("RGB")), np.asarray(source)
    assert np.array_equal(out[:, :16], src[:, :16])  # the white part of the mask is kept when inverted
    assert not np.array_equal(out[:, 16:], src[:, 16:])


def test_inpainting_fill_is_honoured(client):
    """Issue 13: AUTOMATIC1111's inpainting_fill (0 fill, 1 original, 2 latent noise, 3 latent nothing) picks
    what the masked part starts from below strength 1; it was ignored."""
    source = Image.new("RGB", (32, 32), (220, 40, 40))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    body = {"prompt": "a blue square", "steps": 4, "seed": 2, "init_images": [b64_png(source)],
            "mask": b64_png(mask), "denoising_strength": 0.5}  # fmt: skip
    made = {}
    for fill in range(4):
        reply = client.post("/sdapi/v1/img2img", json={**body, "inpainting_fill": fill})
        assert reply.status_code == 200, reply.text
        made[fill] = reply.json()
    infotexts = [json.loads(made[fill]["info"])["infotexts"][0] for fill in range(4)]
    assert "Masked content: fill" in infotexts[0] and "Masked content" not in infotexts[1]
    assert "Masked content: noise" in infotexts[2] and "Masked content: nothing" in infotexts[3]
    assert made[1]["images"][0] != made[2]["images"][0] != made[3]["images"][0]
    refused = client.post("/sdapi/v1/img2img", json={**body, "inpainting_fill": 4})
    assert refused.status_code == 422 and "inpainting_fill" in refused.json()["error"]


def test_options_schedulers_png_info_and_openai_models(client, server):
    import openai

    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"].startswith("shapes-32") and len(options["sd_checkpoint_hash"]) == 64
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "shapes-32"}).status_code == 200
    other = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sd-1.5"})
    assert (
        other.status_code == 422
        and "no model 'sd-1.5' here; this server has: shapes-32" in other.json()["error"]
    )
    assert client.get("/sdapi/v1/schedulers").json()[0]["label"] == "Karras"
    made = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 2, "seed": 5}).json()
    info = client.post("/sdapi/v1/png-info", json={"image": made["images"][0]}).json()
    assert info["info"].startswith("a red circle\nSteps: 2") and info["parameters"]["Seed"] == 5
    api = openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-needed-on-loopback", max_retries=0)
    assert [m.id for m in api.models.list()] == ["shapes-32", "emoji-64"]  # serving first, then the others


def test_a_client_switches_models_by_name_and_a_broken_one_leaves_the_old_serving(pipe, tmp_path):
    """Issue 13: POST /sdapi/v1/options switches to another released model (webuiapi's util_set_model)."""
    import shutil

    import webuiapi

    from unnoise.release import model_catalogue, resolve_model

    shutil.copytree(resolve_model("shapes-32"), tmp_path / "shapes-copy")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"network": 3}')
    models = model_catalogue([tmp_path])
    assert sorted(models) == ["broken", "emoji-64", "shapes-32", "shapes-copy"]
    port = free_port()
    app = create_app(pipe, port=port, models=models, load_model=lambda path: unnoise.load(path, device="cpu"))
    running = Server(app, port)
    try:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port)
        titles = api.util_get_model_names()
        assert any(t.startswith("shapes-copy [") for t in titles) and "broken" in titles
        api.util_set_model("shapes-copy")
        assert api.util_get_current_model().startswith("shapes-copy [")
        made = api.txt2img(prompt="a red circle", steps=2, width=32, height=32)
        assert "Model: shapes-copy" in made.info["infotexts"][0]
        with httpx.Client(base_url=running.url, timeout=120) as client:
            broken = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "broken"})
            assert broken.status_code == 422 and "config.json" in broken.json()["error"], broken.text
            assert client.get("/health").json()["model"] == "shapes-copy"
            back = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "shapes-32"})
            assert back.status_code == 200 and client.get("/health").json()["model"] == "shapes-32"
    finally:
        running.stop()


def test_webuiapi_with_its_default_arguments_gets_images(server):
    """Issue 13: webuiapi sends 512x512 by default, which was a 422; now the largest size this model makes,
    with a note in the info, never a silent stretch."""
    import webuiapi

    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    result = api.txt2img(prompt="a red circle", steps=4)
    assert result.image.size == (64, 64)
    assert "asked for 512x512; made 64x64" in result.info["comments"]["size"]
    assert result.info["width"] == 64 and "Size: 64x64" in result.info["infotexts"][0]
    assert api.util_get_current_model().startswith("shapes-32")
    wide = api.txt2img(prompt="a red circle", steps=4, width=48, height=32, sampler_name="Euler a", seed=3)
    assert wide.image.size == (48, 32) and "comments" not in wide.info
    ddim = api.txt2img(prompt="a red circle", steps=2, width=32, height=32, sampler_name="DDIM")
    assert (
        "Sampler: DDIM, Schedule type: Karras, Eta: 1," in ddim.info["infotexts"][0]
    )  # webuiapi's eta, as A1111


def test_a_cancelled_queued_job_gives_its_place_back_and_finished_jobs_keep_no_inputs(pipe):
    """Issue 12: cancelled queued jobs kept their slots; finished jobs kept their decoded input images."""
    port = free_port()
    app = create_app(pipe, port=port, queue_size=1)
    running = Server(app, port)
    try:
        with httpx.Client(base_url=running.url, timeout=30) as c:
            first, first_owner = submit(c, {"prompt": "x", "steps": 200})
            assert wait_until(
                lambda: c.get(f"/jobs/{first}", headers=first_owner).json()["state"] == "running"
            )
            second, second_owner = submit(c, {"prompt": "x", "steps": 200})
            assert c.post("/jobs", json={"prompt": "x", "steps": 200}).status_code == 429
            c.delete(f"/jobs/{second}", headers=second_owner)
            assert app.state.worker.get(second).call is None  # a job cancelled in the queue keeps no inputs
            third = c.post("/jobs", json={"prompt": "x", "steps": 200})
            assert third.status_code == 202, third.text  # the cancelled job's place is free again
            c.delete(f"/jobs/{first}", headers=first_owner)
            c.delete(f"/jobs/{third.json()['id']}", headers={"X-Job-Token": third.json()["token"]})
            assert wait_until(lambda: not c.get("/health").json()["busy"])
            image = b64_png(Image.new("RGB", (512, 512)))
            done, owner = submit(c, {"prompt": "x", "steps": 2, "init_images": [image]})
            assert wait_until(lambda: c.get(f"/jobs/{done}", headers=owner).json()["state"] == "done")
        assert app.state.worker.get(done).call is None
    finally:
        running.stop()
    # a job that outlives its deadline in the queue keeps none either
    from unnoise.server.jobs import Job, Worker

    worker = Worker(pipe, deadline=0.3)
    slow = worker.submit(Job("generate", lambda pipe, report: time.sleep(0.5) or [], 1, 0))
    waiting = worker.submit(Job("generate", lambda pipe, report: [], 1, 0))
    assert wait_until(lambda: waiting.state == "failed") and waiting.timed_out and slow.state == "done"
    assert waiting.call is None


def test_every_answer_forbids_framing_and_each_request_is_logged_once_without_its_key(pipe, caplog):
    """Issue 12: the page could be framed by another site; issue 13: the server logged no requests, then
    logged them without the job they made or touched and all at one level."""
    import logging
    import re

    port = free_port()
    app = create_app(pipe, port=port, queue_size=2, api_key="sekrit-key", deadline=2.0)
    running = Server(app, port)
    key = {"Authorization": "Bearer sekrit-key"}
    try:
        with caplog.at_level("INFO", logger="unnoise.server.access"):
            page = httpx.get(f"{running.url}/", headers=key)
            refused = httpx.get(f"{running.url}/sdapi/v1/sd-models")
            with httpx.Client(base_url=running.url, headers=key, timeout=60) as c:
                job_id, owner = submit(c, {"prompt": "x", "steps": 1})
                assert wait_until(lambda: c.get(f"/jobs/{job_id}", headers=owner).json()["state"] == "done")
                made = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1})
                late = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 200, "batch_size": 8})
    finally:
        running.stop()
    for reply in (page, refused):
        assert reply.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in reply.headers["content-security-policy"]
    assert refused.status_code == 401 and made.status_code == 200 and late.status_code == 503
    records = [r for r in caplog.records if r.name == "unnoise.server.access"]
    lines = [r.getMessage() for r in records]

    def level_of(pattern: str) -> int:
        found = [r.levelno for r in records if re.fullmatch(pattern, r.getMessage())]
        assert len(found) == 1, (pattern, lines)  # one line a request
        return found[0]

    assert level_of(r"GET / 200 \d+ ms") == logging.INFO
    assert level_of(r"GET /sdapi/v1/sd-models 401 \d+ ms") == logging.WARNING
    assert level_of(rf"POST /jobs 202 \d+ ms job {job_id}") == logging.INFO
    assert level_of(r"POST /sdapi/v1/txt2img 200 \d+ ms job [0-9a-f]{16}") == logging.INFO
    assert level_of(r"POST /sdapi/v1/txt2img 503 \d+ ms job [0-9a-f]{16}") == logging.ERROR
    assert any(
        line.startswith(f"GET /jobs/{job_id} 200") and line.endswith(f"job {job_id}") for line in lines
    )
    assert "sekrit-key" not in caplog.text and owner["X-Job-Token"] not in caplog.text


def test_a_client_that_hangs_up_cancels_its_job(client, server):
    """Issue 12: 17 clients that disconnected filled the queue with jobs nobody would receive."""
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 200}, timeout=1.5)
    assert wait_until(lambda: not client.get("/health").json()["busy"], timeout=20)
    assert client.get("/health").json()["queued"] == 0


def test_many_watchers_hold_no_threads(client):
    """Issue 12: each SSE watcher held a worker thread: 60 on one job made `GET /` take 16 s."""
    job, owner = submit(client, {"prompt": "x", "steps": 60})
    threads = threading.active_count()
    streams = [httpx.Client(base_url=str(client.base_url), timeout=30) for _ in range(60)]
    opened = [s.stream("GET", f"/jobs/{job}/events", headers=owner).__enter__() for s in streams]
    try:
        assert all(r.status_code == 200 for r in opened) and client.get("/").status_code == 200
        assert threading.active_count() - threads < 10  # the server's threads, not one per watcher
    finally:
        client.delete(f"/jobs/{job}", headers=owner)
        for response, s in zip(opened, streams, strict=True):
            response.close()
            s.close()


def test_the_official_openai_client_edits_an_image(server):
    """Issue 13: OpenAI's images.edit (inpainting where the mask is transparent) was a 404."""
    import openai

    rng = np.random.default_rng(2)
    source = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    mask = Image.new("RGBA", (40, 40), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 20, 20))  # transparent: edit here
    files = {}
    for name, picture in (("image", source), ("mask", mask)):
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        files[name] = (f"{name}.png", buffer.getvalue(), "image/png")
    api = openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-needed-on-loopback", max_retries=0)
    result = api.images.edit(image=files["image"], mask=files["mask"], prompt="a blue square in the top left")
    out = np.asarray(png_of(result.data[0].b64_json).convert("RGB"))
    src = np.asarray(source)
    keep = np.ones((40, 40), dtype=bool)
    keep[:20, :20] = False
    assert out.shape == (40, 40, 3) and np.array_equal(out[keep], src[keep])
    assert not np.array_equal(out[:20, :20], src[:20, :20])
    with pytest.raises(openai.BadRequestError, match="no transparent part"):
        api.images.edit(image=files["image"], prompt="x")


def test_a_request_past_the_deadline_is_a_503_and_frees_the_worker(pipe):
    """Issue 12: under a competing CPU-bound process there was no deadline, so clients waited for ever."""
    port = free_port()
    running = Server(create_app(pipe, port=port, queue_size=4, deadline=1.0), port)
    try:
        with httpx.Client(base_url=running.url, timeout=60) as c:
            reply = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 200, "batch_size": 8})
            assert reply.status_code == 503 and "deadline of 1 s" in reply.json()["error"], reply.text
            assert reply.headers["retry-after"] == "30"
            assert wait_until(lambda: not c.get("/health").json()["busy"])
            assert c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1}).status_code == 200
    finally:
        running.stop()


def test_webuiapi_img2img_and_inpainting_with_its_default_arguments(server):
    """Issue 13: webuiapi's img2img with its defaults (512x512, resize_mode 0, inpaint_full_res, mask_blur 4,
    eta 1, image_cfg_scale 1.5, ...) gets images: only-masked inpainting keeps the image's size and its kept
    pixels, as AUTOMATIC1111 does; the whole picture is made at the size txt2img's rule gives, and the info
    says what was asked, what was made and that the input was stretched (resize_mode 0, "Just resize")."""
    import webuiapi

    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    rng = np.random.default_rng(4)
    source = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 255)
    mask.paste(0, (40, 40, 64, 64))  # inverted: the black corner is regenerated, the white rest kept
    far = np.ones((64, 64), dtype=bool)
    far[24:, 24:] = False  # more than mask_blur's reach (4 px, about 3 sigma) from the regenerated corner
    src = np.asarray(source)

    masked = api.img2img(images=[source], mask_image=mask, inpainting_mask_invert=1, steps=4, seed=1)
    out = np.asarray(masked.image.convert("RGB"))
    assert masked.image.size == (64, 64) and np.array_equal(out[far], src[far])
    assert not np.array_equal(out[48:, 48:], src[48:, 48:])
    assert "keeps its 64x64" in masked.info["comments"]["size"]
    assert "Inpaint area: Only masked" in masked.info["infotexts"][0]
    assert masked.image.info["parameters"] == masked.info["infotexts"][0]

    whole = api.img2img(
        images=[source], mask_image=mask, inpainting_mask_invert=1, inpaint_full_res=False, steps=4, seed=1
    )
    out = np.asarray(whole.image.convert("RGB"))
    assert whole.image.size == (64, 64) and np.array_equal(
        out[far], src[far]
    )  # 512x512 -> 64x64, the input's
    assert "asked for 512x512; made 64x64" in whole.info["comments"]["size"]

    wide = source.crop((0, 0, 64, 48))
    stretched = api.img2img(images=[wide], steps=4, seed=1)
    assert stretched.image.size == (64, 64)
    assert "stretched the 64x48 input to 64x64" in stretched.info["comments"]["resize"]
    cropped = api.img2img(images=[wide], steps=4, seed=1, resize_mode=1, width=32, height=32)
    assert cropped.image.size == (32, 32) and "comments" not in cropped.info  # asked for: nothing to say

    halves = Image.new("RGB", (16, 32), (200, 0, 0))
    halves.paste((0, 0, 200), (0, 16, 16, 32))  # red above blue
    filled = api.img2img(images=[halves], denoising_strength=0, resize_mode=2, width=32, height=32)
    pixels = np.asarray(filled.image.convert("RGB"))  # strength 0: the input as brought to 32x32
    assert (pixels[:8, :] == (200, 0, 0)).all() and (pixels[-8:, :] == (0, 0, 200)).all()  # the sides filled
    thin = api.img2img(images=[Image.new("RGB", (1, 80))], steps=2, resize_mode=2, width=32, height=32)
    assert thin.image.size == (32, 32)

    info = api.png_info(masked.image)  # AUTOMATIC1111's PNG Info, through the client
    assert info.info == masked.info["infotexts"][0] and info.parameters["Seed"] == 1


def test_models_carry_the_weights_sha256_and_the_openai_client_retrieves_one(server, pipe, tmp_path):
    """Issue 13: /sd-models gave sha256 None and options the short hash where AUTOMATIC1111 gives the
    weights' full SHA-256 (webuiapi matches the two); openai's models.retrieve was a 404."""
    import shutil

    import openai
    import webuiapi

    from unnoise.release import read_release_config, resolve_model, sha256

    shipped = resolve_model("shapes-32")
    digest = read_release_config(shipped)["weights_sha256"]
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    model = api.get_sd_models()[0]
    assert model["sha256"] == digest and model["hash"] == digest[:10] == pipe.model_hash
    assert api.get_options()["sd_checkpoint_hash"] == digest
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-needed-on-loopback", max_retries=0)
    found = client.models.retrieve("shapes-32")
    assert found.id == "shapes-32" and found.object == "model"
    with pytest.raises(openai.NotFoundError, match=r"'sd-1\.5' does not exist"):
        client.models.retrieve("sd-1.5")

    older = tmp_path / "older"  # a release whose config records no checksum: computed from its weights
    shutil.copytree(shipped, older)
    config = read_release_config(older)
    del config["weights_sha256"]
    (older / "config.json").write_text(json.dumps(config))
    port = free_port()
    running = Server(create_app(pipe, port=port, models={"older": older}), port)
    try:
        listed = {m["model_name"]: m for m in httpx.get(f"{running.url}/sdapi/v1/sd-models").json()}
    finally:
        running.stop()
    assert listed["older"]["sha256"] == sha256(weights_of(older)) == digest
    assert listed["older"]["title"] == f"older [{digest[:10]}]"


def test_only_its_owner_sees_or_cancels_a_job(client, server):
    """Issue 12: any client could see or cancel another's job, and /sdapi/v1/progress gave the running
    job's id. A job is its submitter's: POST /jobs answers a token, without which the job does not exist."""
    job_id, owner = submit(client, {"prompt": "x", "steps": 200})
    other_id, other = submit(client, {"prompt": "y", "steps": 2})
    try:
        assert wait_until(lambda: client.get(f"/jobs/{job_id}", headers=owner).json()["step"] > 0)
        for headers in ({}, other, {"X-Job-Token": "guess"}):
            for method, path in (("GET", ""), ("GET", "/events"), ("DELETE", "")):
                reply = client.request(method, f"/jobs/{job_id}{path}", headers=headers)
                assert reply.status_code == 404 and f"no job '{job_id}'" in reply.json()["error"], reply.text
        assert client.get("/jobs/0123456789abcdef", headers=owner).status_code == 404  # the same answer
        state = client.get("/sdapi/v1/progress").json()["state"]
        assert state["sampling_step"] > 0 and job_id not in json.dumps(state)
        assert client.get(f"/jobs/{job_id}", headers=owner).json()["state"] == "running"
    finally:
        assert client.delete(f"/jobs/{job_id}", headers=owner).json()["id"] == job_id
    assert wait_until(lambda: client.get(f"/jobs/{other_id}", headers=other).json()["state"] == "done")
