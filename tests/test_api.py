"""The contract of POST /api/analytics and the other routes, through the Flask test client."""

import contextlib
import gzip
import json
import os
import socket
from datetime import datetime, timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient
from structlog.testing import capture_logs

from app import create_app
from tests.harness.lines import strict_json
from tests.harness.wsgi import SocketBody, chunked, sized, stalled_body_request

ONE = {"events": [{"type": "page_view"}]}


def post(client: FlaskClient, body: bytes | Any, **kwargs: Any):
    """POST ``body`` (bytes as they are, anything else as JSON) to the ingestion route."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post("/api/analytics", data=data, **kwargs)


def event_lines(capfd: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    """The event lines the service wrote to stdout (fd 1) since the last call."""
    out = capfd.readouterr().out
    return [strict_json(line) for line in out.split("\n") if line]


@pytest.mark.parametrize(
    "content_type",
    [None, "application/json", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded", "image/png"],
)
def test_body_is_json_whatever_the_content_type(client, capfd, content_type):
    """sendBeacon's text/plain, curl -d's form type and no type at all are all parsed as JSON."""
    headers = {"Content-Type": content_type} if content_type else {}
    response = post(client, ONE, headers=headers)
    assert (response.status_code, response.json) == (200, {"success": True, "received": 1})
    assert response.content_type == "application/json"
    assert [line["type"] for line in event_lines(capfd)] == ["page_view"]


def test_seed_example(client, capfd):
    """The seed document's curl example gets the seed document's answer."""
    body = {
        "timestamp": "2024-05-20T14:32:00Z",
        "events": [
            {"type": "article_read", "payload": {"slug": "nextjs-api-routes", "duration_ms": 4500}},
            {"type": "bookmark_added", "payload": {"article_id": "art_8832"}},
        ],
    }
    response = post(client, body, headers={"Content-Type": "application/json"})
    assert (response.status_code, response.json) == (200, {"success": True, "received": 2})
    lines = event_lines(capfd)
    assert [(line["type"], line["payload"]) for line in lines] == [
        ("article_read", {"slug": "nextjs-api-routes", "duration_ms": 4500}),
        ("bookmark_added", {"article_id": "art_8832"}),
    ]
    assert {line["batch_timestamp"] for line in lines} == {"2024-05-20T14:32:00Z"}


def test_query_parameters_are_ignored(client, capfd):
    """Query parameters carry no data."""
    response = client.post("/api/analytics?events=nope&type=x", data=json.dumps(ONE))
    assert (response.status_code, response.json) == (200, {"success": True, "received": 1})
    assert [line["type"] for line in event_lines(capfd)] == ["page_view"]


def test_gzip_body(client, capfd):
    """Content-Encoding: gzip bodies are decompressed."""
    response = post(client, gzip.compress(json.dumps(ONE).encode()), headers={"Content-Encoding": "gzip"})
    assert (response.status_code, response.json) == (200, {"success": True, "received": 1})
    assert len(event_lines(capfd)) == 1


@pytest.mark.parametrize(
    ("body", "headers", "status", "expected"),
    [
        (b"{not json", {}, 400, {"error": "Invalid JSON"}),
        (b"", {}, 400, {"error": "Invalid JSON"}),
        (b'{"events": [{"type": "a"}]', {}, 400, {"error": "Invalid JSON"}),
        (b'{"events": [NaN]}', {}, 400, {"error": "Invalid JSON"}),
        (b'{"events": [Infinity]}', {}, 400, {"error": "Invalid JSON"}),
        (b'{"events": [], "timestamp": 1e400}', {}, 400, {"error": "Invalid JSON"}),
        (b'{"events": [{"type": "\xff"}]}', {}, 400, {"error": "Invalid JSON"}),
        (b"\x1f\x8b\x08\x00garbage", {"Content-Encoding": "gzip"}, 400, {"error": "Invalid JSON"}),
        (gzip.compress(b'{"events": []}')[:-6], {"Content-Encoding": "gzip"}, 400, {"error": "Invalid JSON"}),
        (b'{"events": []}', {"Content-Encoding": "gzip"}, 400, {"error": "Invalid JSON"}),
        (b"[]", {}, 400, {"error": "Invalid events"}),
        (b'"events"', {}, 400, {"error": "Invalid events"}),
        (b"null", {}, 400, {"error": "Invalid events"}),
        (b"{}", {}, 400, {"error": "Invalid events"}),
        (b'{"events": null}', {}, 400, {"error": "Invalid events"}),
        (b'{"events": {"type": "click"}}', {}, 400, {"error": "Invalid events"}),
        (b'{"events": "a"}', {}, 400, {"error": "Invalid events"}),
        (b'{"events": [], "timestamp": "yesterday"}', {}, 400, {"error": "Invalid timestamp"}),
        (b'{"events": [], "timestamp": true}', {}, 400, {"error": "Invalid timestamp"}),
        (b'{"events": [], "timestamp": 1e300}', {}, 400, {"error": "Invalid timestamp"}),
        (b'{"events": [], "timestamp": {}}', {}, 400, {"error": "Invalid timestamp"}),
        (
            b'{"events": []}',
            {"Content-Encoding": "br"},
            415,
            {"error": "Unsupported Content-Encoding", "supported": ["gzip", "x-gzip", "identity"]},
        ),
        (
            b'{"events": []}',
            {"Content-Encoding": "deflate"},
            415,
            {"error": "Unsupported Content-Encoding", "supported": ["gzip", "x-gzip", "identity"]},
        ),
    ],
)
def test_bad_requests(client, capfd, body, headers, status, expected):
    """Each malformed request gets its status and JSON error, and nothing is logged."""
    response = post(client, body, headers=headers)
    assert (response.status_code, response.json) == (status, expected)
    assert response.content_type == "application/json"
    assert event_lines(capfd) == []


@pytest.mark.parametrize(
    ("event", "errors"),
    [
        ({}, {"type": ["Missing data for required field."]}),
        ({"type": ""}, {"type": ["Length must be between 1 and 256."]}),
        ({"type": "x" * 257}, {"type": ["Length must be between 1 and 256."]}),
        ({"type": 5}, {"type": ["Not a valid string."]}),
        ({"type": None}, {"type": ["Field may not be null."]}),
        ({"type": "a", "payload": []}, {"payload": ["Not a valid mapping type."]}),
        ({"type": "a", "payload": "x"}, {"payload": ["Not a valid mapping type."]}),
        ({"type": "a", "userId": 42}, {"userId": ["Not a valid string."]}),
        ({"type": "a", "sessionId": {}}, {"sessionId": ["Not a valid string."]}),
        ({"type": "a", "id": "i" * 129}, {"id": ["Longer than maximum length 128."]}),
        ({"type": "a", "extra": 1, "more": 2}, {"extra": ["Unknown field."], "more": ["Unknown field."]}),
        (
            {"type": "a", "timestamp": "soon"},
            {"timestamp": ["Not a valid timestamp: use an ISO 8601 string or Unix time in seconds or milliseconds."]},
        ),
        ("page_view", {"_schema": ["Invalid input type."]}),
        ([{"type": "a"}], {"_schema": ["Invalid input type."]}),
        (None, {"_schema": ["Invalid input type."]}),
    ],
)
def test_invalid_event_is_rejected_alone(client, capfd, event, errors):
    """An invalid event is reported with marshmallow's messages; the valid one beside it is accepted."""
    response = post(client, {"events": [{"type": "ok"}, event]})
    assert (response.status_code, response.json) == (
        200,
        {"success": True, "received": 1, "rejected": [{"index": 1, "errors": errors}]},
    )
    assert [line["type"] for line in event_lines(capfd)] == ["ok"]


def test_rejected_entries_carry_the_event_id(client, capfd):
    """A rejected event's own id comes back, so the client knows which of its events it was."""
    body = {"events": [{"id": "e-1", "type": ""}, {"id": "e-2", "type": "fine"}, {"id": "e-3", "bogus": True}]}
    response = post(client, body)
    assert response.status_code == 200
    assert response.json == {
        "success": True,
        "received": 1,
        "rejected": [
            {"index": 0, "id": "e-1", "errors": {"type": ["Length must be between 1 and 256."]}},
            {
                "index": 2,
                "id": "e-3",
                "errors": {"bogus": ["Unknown field."], "type": ["Missing data for required field."]},
            },
        ],
    }
    assert [line["id"] for line in event_lines(capfd)] == ["e-2"]


def test_all_invalid_is_400_with_rejections(client, capfd):
    """A non-empty batch with no valid event is a 400 that still says what was wrong."""
    response = post(client, {"events": [{"type": ""}, 7]})
    assert (response.status_code, response.json) == (
        400,
        {
            "error": "Invalid events",
            "rejected": [
                {"index": 0, "errors": {"type": ["Length must be between 1 and 256."]}},
                {"index": 1, "errors": {"_schema": ["Invalid input type."]}},
            ],
        },
    )
    assert event_lines(capfd) == []


def test_empty_batch(client, capfd):
    """An empty batch is accepted and writes nothing."""
    response = post(client, {"events": []})
    assert (response.status_code, response.json) == (200, {"success": True, "received": 0})
    assert capfd.readouterr().out == ""


def test_null_optional_fields_mean_absent(client, capfd):
    """null for an optional field is as if it were not sent: the line leaves it off."""
    event = {"type": "a", "payload": None, "userId": None, "sessionId": None, "id": None, "timestamp": None}
    response = post(client, {"events": [event], "timestamp": None})
    assert (response.status_code, response.json) == (200, {"success": True, "received": 1})
    (line,) = event_lines(capfd)
    assert set(line) == {"kind", "type", "received_at", "request_id", "client_ip"}


def test_event_line_fields(client, capfd):
    """An event line carries the event, both timestamps normalised to UTC, the event's corrected for the client's
    clock, the receive time, request id and anonymized address."""
    event = {
        "type": "signup",
        "payload": {"plan": "pro", "seats": 3},
        "userId": "u-1",
        "sessionId": "s-1",
        "id": "0b7f3c52-3f6c-4a9e-9b1e-3f1f2f0c7d11",
        "timestamp": "2024-05-20T16:32:00+02:00",
    }
    response = post(client, {"events": [event], "timestamp": 1716215525}, headers={"X-Request-ID": "ignored"})
    assert (response.status_code, response.json) == (200, {"success": True, "received": 1})
    (line,) = event_lines(capfd)
    received_at = line.pop("received_at")
    assert received_at.endswith("Z") and received_at[:4].isdigit()
    # The client's clock was (received_at - 14:32:05) behind ours; the event happened 5 s before it sent the batch.
    derived_timestamp = (datetime.fromisoformat(received_at) - timedelta(seconds=5)).isoformat().replace("+00:00", "Z")
    assert line == {
        "kind": "event",
        "type": "signup",
        "payload": {"plan": "pro", "seats": 3},
        "userId": "u-1",
        "sessionId": "s-1",
        "id": "0b7f3c52-3f6c-4a9e-9b1e-3f1f2f0c7d11",
        "timestamp": "2024-05-20T14:32:00Z",
        "derived_timestamp": derived_timestamp,
        "batch_timestamp": "2024-05-20T14:32:05Z",
        "request_id": response.headers["X-Request-ID"],
        "client_ip": "127.0.0.0",
    }


@pytest.mark.parametrize("type_first", [True, False])
def test_every_line_starts_with_kind_then_type(client, capfd, type_first):
    """Whatever order a client sends an event's fields in, its line starts with kind and type, the event's other
    fields following in the order sent."""
    sent = [{"type": "a", "id": "1", "payload": {"type": "inner"}}, {"id": "2", "payload": {}, "type": "b"}]
    events = sent[:1] * 2 if type_first else sent
    response = post(client, {"events": events})
    assert (response.status_code, response.json) == (200, {"success": True, "received": 2})
    lines = capfd.readouterr().out.splitlines()
    assert [line[: line.index(',"received_at"')] for line in lines] == [
        '{"kind":"event","type":"a","id":"1","payload":{"type":"inner"}',
        '{"kind":"event","type":"a","id":"1","payload":{"type":"inner"}'
        if type_first
        else '{"kind":"event","type":"b","id":"2","payload":{}',
    ]


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        ("2024-05-20T14:32:00Z", "2024-05-20T14:32:00Z"),
        ("2024-05-20T14:32:00.250Z", "2024-05-20T14:32:00.250000Z"),
        ("2024-05-20T09:32:00-05:00", "2024-05-20T14:32:00Z"),
        ("2024-05-20T14:32:00", "2024-05-20T14:32:00Z"),
        ("2024-05-20", "2024-05-20T00:00:00Z"),
        (1716215520, "2024-05-20T14:32:00Z"),
        (1716215520.5, "2024-05-20T14:32:00.500000Z"),
        (1716215520000, "2024-05-20T14:32:00Z"),
        (99999999999, "5138-11-16T09:46:39Z"),
        (100000000000, "1973-03-03T09:46:40Z"),
        # Every digit kept: through a float in seconds these came out a microsecond or more early.
        (10413792000123, "2300-01-01T00:00:00.123000Z"),
        (253402300799999, "9999-12-31T23:59:59.999000Z"),
        (-100000000001, "1966-10-31T14:13:19.999000Z"),
        (0, "1970-01-01T00:00:00Z"),
    ],
)
def test_timestamp_forms(client, capfd, timestamp, expected):
    """ISO 8601 with or without zone and Unix seconds or milliseconds all become RFC 3339 UTC."""
    response = post(client, {"events": [{"type": "a", "timestamp": timestamp}], "timestamp": timestamp})
    assert (response.status_code, response.json) == (200, {"success": True, "received": 1})
    (line,) = event_lines(capfd)
    assert (line["timestamp"], line["batch_timestamp"]) == (expected, expected)


def test_redaction_at_any_depth(client, capfd):
    """Secret-looking keys are masked wherever they are in the payload, whatever their case."""
    payload = {
        "password": "hunter2",
        "user": {"name": "ann", "API_KEY": "k", "cards": [{"Card-Number": "4111", "last4": "1111"}]},
        "accessToken": "t",
        "tokenizer": 3,
        "note": "password",
    }
    response = post(client, {"events": [{"type": "a", "payload": payload}]})
    assert (response.status_code, response.json) == (200, {"success": True, "received": 1})
    (line,) = event_lines(capfd)
    assert line["payload"] == {
        "password": "[REDACTED]",
        "user": {"name": "ann", "API_KEY": "[REDACTED]", "cards": [{"Card-Number": "[REDACTED]", "last4": "1111"}]},
        "accessToken": "[REDACTED]",
        "tokenizer": 3,
        "note": "password",
    }


def test_redact_keys_setting(capfd):
    """REDACT_KEYS replaces the default list."""
    client = create_app({"TESTING": True, "REDACT_KEYS": ["email"]}).test_client()
    response = post(client, {"events": [{"type": "a", "payload": {"Email": "a@b.c", "password": "p"}}]})
    assert (response.status_code, response.json) == (200, {"success": True, "received": 1})
    assert event_lines(capfd)[0]["payload"] == {"Email": "[REDACTED]", "password": "p"}


def batch_of_size(size: int) -> bytes:
    """A valid one-event batch of exactly ``size`` bytes."""
    base = b'{"events": [{"type": "a", "payload": {"pad": ""}}]}'
    return base.replace(b'""', b'"' + b"x" * (size - len(base)) + b'"')


LIMIT = 4096


@pytest.fixture
def small(capfd) -> FlaskClient:
    """A client of an app with small limits, so edges are cheap to reach."""
    return create_app({"TESTING": True, "MAX_BODY_BYTES": LIMIT, "MAX_EVENTS": 3}).test_client()


@pytest.mark.parametrize("send", [sized, chunked])
def test_body_limit_on_the_wire(small, capfd, send):
    """A body over MAX_BODY_BYTES is a 413 naming the limit, with or without a Content-Length."""
    response = small.post("/api/analytics", **send(batch_of_size(LIMIT)))
    assert (response.request.content_length is None) == (send is chunked)
    assert (response.status_code, response.json) == (200, {"success": True, "received": 1})
    response = small.post("/api/analytics", **send(batch_of_size(LIMIT + 1)))
    assert (response.status_code, response.json) == (413, {"error": "Payload too large", "limit_bytes": LIMIT})
    assert len(event_lines(capfd)) == 1


def test_body_limit_after_decompression(small, capfd):
    """A small gzip body that inflates past MAX_BODY_BYTES is a 413 too."""
    fits = gzip.compress(batch_of_size(LIMIT))
    bomb = gzip.compress(batch_of_size(LIMIT + 1))
    assert len(bomb) < LIMIT
    response = small.post("/api/analytics", data=fits, headers={"Content-Encoding": "gzip"})
    assert (response.status_code, response.json) == (200, {"success": True, "received": 1})
    response = small.post("/api/analytics", data=bomb, headers={"Content-Encoding": "gzip"})
    assert (response.status_code, response.json) == (413, {"error": "Payload too large", "limit_bytes": LIMIT})
    assert len(event_lines(capfd)) == 1


def test_too_many_events(small, capfd):
    """More than MAX_EVENTS events is a 413 naming the limit; exactly MAX_EVENTS is fine."""
    response = post(small, {"events": [{"type": "a"}] * 3})
    assert (response.status_code, response.json) == (200, {"success": True, "received": 3})
    response = post(small, {"events": [{"type": "a"}] * 4})
    assert (response.status_code, response.json) == (413, {"error": "Too many events", "limit_events": 3})
    assert len(event_lines(capfd)) == 3


def test_event_size_limit(capfd):
    """An event whose compact JSON passes MAX_EVENT_BYTES is rejected on its own."""
    client = create_app({"TESTING": True, "MAX_EVENT_BYTES": 100}).test_client()
    base = len(b'{"type":"a","payload":{"p":""}}')
    fits = {"type": "a", "payload": {"p": "x" * (100 - base)}}
    too_big = {"type": "a", "payload": {"p": "x" * (101 - base)}}
    response = post(client, {"events": [fits, too_big]})
    assert (response.status_code, response.json) == (
        200,
        {
            "success": True,
            "received": 1,
            "rejected": [{"index": 1, "errors": {"_schema": ["Event is larger than 100 bytes as JSON."]}}],
        },
    )
    assert len(event_lines(capfd)) == 1


def test_payload_nested_too_deeply_to_log(client, capfd):
    """JSON parses up to 1024 levels but a line can hold 254: deeper events are rejected, not a 500."""
    payload = "[" * 300 + "]" * 300
    body = ('{"events": [{"type": "deep", "payload": {"a": ' + payload + '}}, {"type": "ok"}]}').encode()
    response = post(client, body)
    assert (response.status_code, response.json) == (
        200,
        {
            "success": True,
            "received": 1,
            "rejected": [{"index": 0, "errors": {"_schema": ["Event is nested too deeply to log."]}}],
        },
    )
    assert [line["type"] for line in event_lines(capfd)] == ["ok"]


@pytest.mark.parametrize(
    ("method", "path", "status", "expected", "allow"),
    [
        ("GET", "/nowhere", 404, {"error": "Not found"}, None),
        ("POST", "/api/analytics/", 404, {"error": "Not found"}, None),
        ("GET", "/api/analytics", 405, {"error": "Method not allowed"}, "OPTIONS, POST"),
        ("PUT", "/api/analytics", 405, {"error": "Method not allowed"}, "OPTIONS, POST"),
        ("DELETE", "/api/analytics", 405, {"error": "Method not allowed"}, "OPTIONS, POST"),
        ("POST", "/healthz", 405, {"error": "Method not allowed"}, "GET, HEAD, OPTIONS"),
        ("GET", "/healthz", 200, {"status": "ok"}, None),
    ],
)
def test_other_routes(client, method, path, status, expected, allow):
    """Unknown paths and methods get JSON errors; 405 says what is allowed."""
    response = client.open(path, method=method)
    assert (response.status_code, response.json) == (status, expected)
    assert response.content_type == "application/json"
    if allow:
        assert sorted(response.headers["Allow"].split(", ")) == sorted(allow.split(", "))
    assert response.headers["X-Request-ID"]


def test_cors_preflight_and_headers(client):
    """A browser on another origin may POST: preflight answered, CORS headers on the answer, no credentials."""
    preflight = client.options(
        "/api/analytics",
        headers={
            "Origin": "https://shop.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, content-encoding",
        },
    )
    assert (preflight.status_code, preflight.data) == (204, b"")
    assert preflight.headers["Access-Control-Allow-Origin"] == "*"
    assert preflight.headers["Access-Control-Allow-Methods"] == "OPTIONS, POST"
    assert preflight.headers["Access-Control-Allow-Headers"] == "content-type, content-encoding"
    assert preflight.headers["Access-Control-Max-Age"] == "86400"
    assert "Access-Control-Allow-Credentials" not in preflight.headers
    response = post(client, {"events": []}, headers={"Origin": "https://shop.example"})
    assert (response.status_code, response.json) == (200, {"success": True, "received": 0})
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert response.headers["Access-Control-Expose-Headers"] == "X-Request-ID, Retry-After"
    assert "Access-Control-Allow-Credentials" not in response.headers


def test_no_cors_headers_without_an_origin_or_outside_the_api(client):
    """Server-to-server requests carry no Origin and get no CORS headers; nor do paths outside /api/."""
    response = post(client, {"events": []})
    assert (response.status_code, response.json) == (200, {"success": True, "received": 0})
    assert not [name for name in response.headers.keys() if name.startswith("Access-Control-")]
    health = client.get("/healthz", headers={"Origin": "https://shop.example"})
    assert (health.status_code, health.json) == (200, {"status": "ok"})
    assert "Access-Control-Allow-Origin" not in health.headers


def test_cors_origins_setting(capfd):
    """With CORS_ORIGINS listed, those origins are named (and Vary says so); others are refused, nothing written."""
    client = create_app({"TESTING": True, "CORS_ORIGINS": ["https://shop.example"]}).test_client()
    allowed = post(client, ONE, headers={"Origin": "https://shop.example"})
    assert (allowed.status_code, allowed.json) == (200, {"success": True, "received": 1})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    assert "Origin" in allowed.headers["Vary"]
    assert len(event_lines(capfd)) == 1
    # A text/plain POST needs no preflight: the browser sends it, and only hides the answer.
    for origin in ("https://evil.example", "https://shop.example.evil.example", "null", "https://SHOP.example"):
        other = post(client, ONE, headers={"Origin": origin, "Content-Type": "text/plain"})
        assert (other.status_code, other.json) == (403, {"error": "Origin not allowed"}), origin
        assert "Access-Control-Allow-Origin" not in other.headers
        assert len(other.headers["X-Request-ID"]) == 32
    preflight = client.options(
        "/api/analytics", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert (preflight.status_code, preflight.json) == (403, {"error": "Origin not allowed"})
    # Servers and curl send no Origin: not a browser's request, not refused.
    plain = post(client, ONE)
    assert (plain.status_code, plain.json) == (200, {"success": True, "received": 1})
    assert len(event_lines(capfd)) == 1
    # Paths outside the API (the script, the demo page) are for every origin.
    assert client.get("/healthz", headers={"Origin": "https://evil.example"}).status_code == 200


@pytest.mark.parametrize(
    ("remote", "headers", "request_id", "client_ip"),
    [
        # Addresses as written by default (CLIENT_IP anonymized): the last octet zeroed.
        ("127.0.0.1", {"X-Request-ID": "proxy-id-1", "X-Forwarded-For": "203.0.113.9"}, "proxy-id-1", "203.0.113.0"),
        ("127.0.0.1", {"X-Forwarded-For": "198.51.100.1, 203.0.113.9, 127.0.0.1"}, None, "203.0.113.0"),
        ("203.0.113.50", {"X-Request-ID": "spoofed", "X-Forwarded-For": "10.0.0.1"}, None, "203.0.113.0"),
        ("127.0.0.1", {"X-Request-ID": "bad id<script>"}, None, "127.0.0.0"),
    ],
)
def test_forwarded_headers_only_from_trusted_proxies(client, capfd, remote, headers, request_id, client_ip):
    """X-Request-ID and X-Forwarded-For are believed from TRUSTED_PROXIES only, and ids must look like ids."""
    response = post(client, ONE, headers=headers, environ_base={"REMOTE_ADDR": remote})
    assert (response.status_code, response.json) == (200, {"success": True, "received": 1})
    (line,) = event_lines(capfd)
    if request_id:
        assert response.headers["X-Request-ID"] == request_id
    else:
        assert len(response.headers["X-Request-ID"]) == 32
        assert response.headers["X-Request-ID"] != headers.get("X-Request-ID")
    assert line["request_id"] == response.headers["X-Request-ID"]
    assert line["client_ip"] == client_ip


def test_client_ip_none(capfd):
    """CLIENT_IP none leaves the address off event lines."""
    client = create_app({"TESTING": True, "CLIENT_IP": "none"}).test_client()
    response = post(client, ONE)
    assert (response.status_code, response.json) == (200, {"success": True, "received": 1})
    assert "client_ip" not in event_lines(capfd)[0]


@pytest.fixture
def broken_stdout(capfd):
    """fd 1 becomes a pipe; the function returned takes its reader away, as when a log router dies."""
    saved = os.dup(1)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 1)
    os.close(write_end)
    yield lambda: os.close(read_end)
    os.dup2(saved, 1)
    os.close(saved)


def fill_pipe(fd: int) -> None:
    """Write to the pipe ``fd`` until it takes no more."""
    os.set_blocking(fd, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(fd, b"x" * 4096)
    os.set_blocking(fd, True)


@pytest.fixture
def full_stdout(capfd):
    """fd 1 becomes a pipe nobody reads; the function returned fills it: writing would then block forever."""
    saved = os.dup(1)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 1)
    os.close(write_end)
    yield lambda: fill_pipe(1)
    os.dup2(saved, 1)
    os.close(saved)
    os.close(read_end)


@pytest.mark.parametrize("stdout", ["broken_stdout", "full_stdout"])
@pytest.mark.parametrize("seen_as", ["pipe", "file"])
def test_log_write_failure_is_500(request, stdout, seen_as):
    """When the event log cannot take the batch, the client is told to retry instead of getting a 200.

    The writer looks at stdout once, when the app is built: built after the
    fixture it sees the pipe (and waits for room), before it, pytest's file (and
    polls). stdout fails after the app is built: one that fails before is refused
    at start (tests/test_faults.py).
    """
    if seen_as == "pipe":
        fail = request.getfixturevalue(stdout)
    client = create_app({"LOG_WRITE_TIMEOUT": 0.2}).test_client()
    if seen_as == "file":
        fail = request.getfixturevalue(stdout)
    with capture_logs() as logs:
        fail()
        response = post(client, ONE)
    assert (response.status_code, response.json) == (500, {"error": "Failed to process events"})
    assert response.content_type == "application/json"
    assert [entry["event"] for entry in logs] == ["event_log_write_failed"]


def test_unexpected_error_is_json_500(monkeypatch):
    """A bug of ours is a JSON 500, logged with its traceback, not Flask's HTML page."""
    app = create_app()

    def explode(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(app.extensions["ingestor"], "check", explode)
    with capture_logs() as logs:
        response = post(app.test_client(), ONE)
    assert (response.status_code, response.json) == (500, {"error": "Internal server error"})
    assert logs[0]["event"] == "unhandled_exception" and logs[0]["log_level"] == "error"


def test_settings_from_environment(monkeypatch):
    """ANALYTICS_* variables override the defaults, parsed as JSON."""
    monkeypatch.setenv("ANALYTICS_MAX_EVENTS", "2")
    monkeypatch.setenv("ANALYTICS_CORS_ORIGINS", '["https://a.example"]')
    app = create_app({"TESTING": True})
    assert app.config["MAX_EVENTS"] == 2
    assert app.config["CORS_ORIGINS"] == ["https://a.example"]
    response = post(app.test_client(), {"events": [{"type": "a"}] * 3})
    assert (response.status_code, response.json) == (413, {"error": "Too many events", "limit_events": 2})


def test_stalled_body_is_408(capfd):
    """A body that stops arriving for BODY_READ_TIMEOUT is a JSON 408, and nothing is written."""
    client = create_app({"TESTING": True, "BODY_READ_TIMEOUT": 0.2}).test_client()
    response = stalled_body_request(client)
    assert (response.status_code, response.json) == (408, {"error": "Request timeout"})
    assert event_lines(capfd) == []


def test_body_shorter_than_its_content_length_is_400(client, capfd):
    """A client that closes before sending its Content-Length's worth sent an incomplete body."""
    server_end, client_end = socket.socketpair()
    with server_end:
        client_end.sendall(b'{"events": [{"type": "cut"}]}')
        client_end.close()
        environ = {"wsgi.input": SocketBody(server_end), "wsgi.input_terminated": True, "CONTENT_LENGTH": "1000"}
        response = client.post("/api/analytics", environ_overrides=environ)
    assert (response.status_code, response.json) == (400, {"error": "Invalid JSON"})
    assert event_lines(capfd) == []
