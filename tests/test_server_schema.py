"""Schemathesis against the server's own OpenAPI schema: requests generated from it, valid and not, never
get a 5xx. A tiny model keeps each request cheap; the worker is the real one."""

import pytest

import unnoise
from unnoise.server.app import create_app
from unnoise.train.config import TrainConfig
from unnoise.train.loop import train

from .test_server import Server, free_port

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed")
from hypothesis import HealthCheck, given, settings  # noqa: E402  (schemathesis brings hypothesis)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    model = train(
        TrainConfig(preset="tiny", batch_size=4, steps=2, checkpoint_every=2, sample_every=0, out=str(out))
    )
    port = free_port()
    running = Server(create_app(unnoise.load(model), port=port, queue_size=64), port)
    yield running
    running.stop()


def test_no_generated_request_gets_a_server_error(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    seen = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call(base_url=server.url, timeout=60)
            seen.append(response.status_code)
            assert response.status_code < 500, (case.method, case.path, response.text[:300])
            assert "Traceback" not in response.text

        check()
    assert len(seen) >= 5 * len(operations)
