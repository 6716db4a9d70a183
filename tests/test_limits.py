"""Every limit at its edges: one below, exactly at, and one past, at small limits and at the defaults."""

import gzip
import http.client
import socket
import threading
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from config import Config
from tests.harness.gunicorn import Server
from tests.harness.lines import parse_lines, strict_json
from tests.harness.wsgi import chunked, sized

SMALL = {"MAX_BODY_BYTES": 2000, "MAX_EVENTS": 5, "MAX_EVENT_BYTES": 300}
DEFAULTS = {name: getattr(Config, name) for name in SMALL}
LIMITS = [pytest.param(SMALL, id="small"), pytest.param(DEFAULTS, id="defaults")]


@pytest.fixture(params=LIMITS)
def limits(request: pytest.FixtureRequest) -> dict[str, int]:
    """The limits under test: small ones, then the defaults of config.py."""
    return request.param


@pytest.fixture
def app_with(limits: dict[str, int]) -> Flask:
    """An app with those limits."""
    return create_app({"TESTING": True, **limits})


def body_of_size(size: int) -> bytes:
    """A valid one-event batch of exactly ``size`` bytes, padded with JSON whitespace."""
    body = b'{"events":[{"type":"edge"}]}'
    return body + b" " * (size - len(body))


def event_of_size(size: int) -> dict[str, Any]:
    """An event whose compact JSON (orjson.dumps) is exactly ``size`` bytes; two-byte characters included."""
    event = {"type": "edge", "payload": {"s": "é"}}
    pad = size - len(orjson.dumps(event))
    event["payload"]["s"] += "x" * pad
    assert len(orjson.dumps(event)) == size
    return event


def post(client: FlaskClient, capfd: pytest.CaptureFixture[bytes], **kwargs: Any) -> tuple[int, Any, list[Any]]:
    """POST to the ingestion route; return the status, the JSON answer and the event lines written."""
    capfd.readouterr()
    response = client.post("/api/analytics", **kwargs)
    return response.status_code, strict_json(response.data), parse_lines(capfd.readouterr().out)


def too_large(limit: int) -> tuple[int, dict[str, Any]]:
    """The 413 for a body over ``limit`` bytes."""
    return 413, {"error": "Payload too large", "limit_bytes": limit}


ACCEPTED_ONE = (200, {"success": True, "received": 1})


@pytest.mark.parametrize("send", [sized, chunked])
@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_body_size_on_the_wire(app_with, limits, capfdbinary, send, delta):
    """A body of MAX_BODY_BYTES - 1 or MAX_BODY_BYTES is accepted; one byte more is a 413, with or without length."""
    limit = limits["MAX_BODY_BYTES"]
    status, answer, lines = post(app_with.test_client(), capfdbinary, **send(body_of_size(limit + delta)))
    expected = too_large(limit) if delta > 0 else ACCEPTED_ONE
    assert (status, answer) == expected
    assert len(lines) == (0 if delta > 0 else 1)


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_body_size_after_decompression(app_with, limits, capfdbinary, delta):
    """A small gzip body inflating to MAX_BODY_BYTES - 1 or MAX_BODY_BYTES is accepted; one byte more is a 413."""
    limit = limits["MAX_BODY_BYTES"]
    wire = gzip.compress(body_of_size(limit + delta))
    assert len(wire) < limit // 10
    status, answer, lines = post(app_with.test_client(), capfdbinary, data=wire, headers={"Content-Encoding": "gzip"})
    assert (status, answer) == (too_large(limit) if delta > 0 else ACCEPTED_ONE)
    assert len(lines) == (0 if delta > 0 else 1)


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_gzip_body_size_on_the_wire(app_with, limits, capfdbinary, delta):
    """The wire limit holds for gzip bodies too: incompressible ones of limit - 1 and limit pass it, limit + 1 not."""
    limit = limits["MAX_BODY_BYTES"]
    # Stored (level 0) deflate: the wire size is the body plus its framing, so it can be set to the byte.
    framing = len(gzip.compress(body_of_size(limit), compresslevel=0)) - limit
    body = body_of_size(limit + delta - framing)
    wire = gzip.compress(body, compresslevel=0)
    assert len(wire) == limit + delta
    status, answer, lines = post(app_with.test_client(), capfdbinary, data=wire, headers={"Content-Encoding": "gzip"})
    assert (status, answer) == (too_large(limit) if delta > 0 else ACCEPTED_ONE)
    assert len(lines) == (0 if delta > 0 else 1)


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_events_per_batch(app_with, limits, capfdbinary, delta):
    """MAX_EVENTS - 1 and MAX_EVENTS events are accepted; one more is a 413 and nothing is written."""
    count = limits["MAX_EVENTS"] + delta
    body = orjson.dumps({"events": [{"type": "edge", "id": str(index)} for index in range(count)]})
    status, answer, lines = post(app_with.test_client(), capfdbinary, data=body)
    if delta > 0:
        assert (status, answer) == (413, {"error": "Too many events", "limit_events": limits["MAX_EVENTS"]})
        assert lines == []
    else:
        assert (status, answer) == (200, {"success": True, "received": count})
        assert [line["id"] for line in lines] == [str(index) for index in range(count)]


@pytest.mark.parametrize("spaced", [False, True], ids=["compact", "spaced"])
@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_event_size(app_with, limits, capfdbinary, delta, spaced):
    """An event of MAX_EVENT_BYTES as compact JSON is accepted, one byte more rejected alone, however it was sent."""
    limit = limits["MAX_EVENT_BYTES"]
    edge = event_of_size(limit + delta)
    events = [edge, {"type": "beside"}]
    body = orjson.dumps({"events": events}, option=orjson.OPT_INDENT_2 if spaced else 0)
    status, answer, lines = post(app_with.test_client(), capfdbinary, data=body)
    if delta > 0:
        rejection = {"index": 0, "errors": {"_schema": [f"Event is larger than {limit} bytes as JSON."]}}
        assert (status, answer) == (200, {"success": True, "received": 1, "rejected": [rejection]})
        assert [line["type"] for line in lines] == ["beside"]
    else:
        assert (status, answer) == (200, {"success": True, "received": 2})
        assert lines[0]["payload"] == edge["payload"]


@pytest.mark.parametrize(
    ("field", "limit", "message"),
    [("type", 256, "Length must be between 1 and 256."), ("id", 128, "Longer than maximum length 128.")],
)
@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_string_lengths(client, capfdbinary, field, limit, message, delta):
    """``type`` up to 256 characters and ``id`` up to 128 (counted in characters, not bytes); one more is rejected."""
    value = "é" * (limit + delta)
    event = {"type": "edge", field: value}
    status, answer, lines = post(client, capfdbinary, data=orjson.dumps({"events": [event, {"type": "beside"}]}))
    if delta > 0:
        rejection = {"index": 0, "errors": {field: [message]}}
        assert (status, answer) == (200, {"success": True, "received": 1, "rejected": [rejection]})
        assert len(lines) == 1
    else:
        assert (status, answer) == (200, {"success": True, "received": 2})
        assert lines[0][field] == value


# --- on the wire, through real gunicorn ------------------------------------------------------------

WIRE_LIMIT = 4096


@pytest.fixture(scope="module")
def gunicorn(start_module_server: Callable[..., Server]) -> Server:
    """Real gunicorn with a small MAX_BODY_BYTES."""
    return start_module_server(workers=2, env={"ANALYTICS_MAX_BODY_BYTES": str(WIRE_LIMIT)})


def post_over_http(server: Server, body: bytes, chunked: bool) -> tuple[int, Any]:
    """POST with a Content-Length, or chunked in 1000-byte pieces; return the status and the JSON answer."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        if chunked:
            pieces = iter([body[start : start + 1000] for start in range(0, len(body), 1000)])
            connection.request("POST", "/api/analytics", body=pieces, encode_chunked=True)
        else:
            connection.request("POST", "/api/analytics", body=body)
        response = connection.getresponse()
        return response.status, strict_json(response.read())
    finally:
        connection.close()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_size_through_gunicorn(gunicorn, chunked):
    """Real gunicorn, sized or chunked: limit - 1 and limit accepted, limit + 1 a 413 that writes nothing."""
    start = gunicorn.fence()
    answers = [post_over_http(gunicorn, body_of_size(WIRE_LIMIT + delta), chunked) for delta in (-1, 0, 1)]
    assert answers == [ACCEPTED_ONE, ACCEPTED_ONE, too_large(WIRE_LIMIT)]
    assert [line["type"] for line in gunicorn.lines_since(start)] == ["edge", "edge"]


def test_a_slow_body_over_the_limit_gets_its_413_before_the_worker_timeout(gunicorn):
    """A body declared over the limit and sent slowly but steadily: the service reads and drops it for DRAIN_SECONDS
    only, then answers its JSON 413; draining it whole would last past gunicorn's 30 s worker timeout, which ends
    the worker and answers gunicorn's HTML 500."""
    with socket.create_connection(("127.0.0.1", gunicorn.port), timeout=25) as sock:
        declared = 8 * 1024 * 1024
        sock.sendall(
            b"POST /api/analytics HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % declared
        )
        done = threading.Event()

        def trickle() -> None:
            # 20 KB a second, 400 s for the whole body: never a pause of BODY_READ_TIMEOUT.
            while not done.wait(0.5):
                try:
                    sock.sendall(b" " * 10_000)
                except OSError:
                    return

        sender = threading.Thread(target=trickle, daemon=True)
        sender.start()
        response = http.client.HTTPResponse(sock)
        try:
            response.begin()
            answer = (response.status, strict_json(response.read()))
        finally:
            done.set()
            sender.join(timeout=5)
    assert answer == too_large(WIRE_LIMIT)
