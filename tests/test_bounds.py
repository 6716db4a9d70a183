"""What one request can make the service spend is bounded by its size: log bytes and CPU.

Memory is bounded in tests/test_memory.py. Costs here are measured against a
valid batch in the same run, never against a fixed time: the machine is shared.
"""

from typing import Any

import orjson
import pytest
from flask.testing import FlaskClient

from analytics.lines import CONTEXT_ALLOWANCE, GROWTH
from app import create_app
from config import Config
from tests.harness.costs import WORST_OVER_VALID, cpu_over_valid
from tests.harness.events import EXPANDING, LONGEST_ADDRESS, LONGEST_REQUEST_ID, expanding_event

MAX_BODY = Config.MAX_BODY_BYTES


def send(client: FlaskClient, body: bytes) -> Any:
    """POST ``body`` as a trusted proxy would, with the longest request id and address it may pass on."""
    return client.post(
        "/api/analytics",
        data=body,
        headers={"X-Request-ID": LONGEST_REQUEST_ID, "X-Forwarded-For": LONGEST_ADDRESS},
        environ_base={"REMOTE_ADDR": "127.0.0.1"},
    )


def fill(prefix: bytes, unit: bytes, suffix: bytes, size: int = MAX_BODY) -> bytes:
    """``prefix``, then ``unit`` repeated (comma-separated) as often as fits in ``size`` bytes, then ``suffix``."""
    count = (size - len(prefix) - len(suffix) + 1) // (len(unit) + 1)
    return prefix + b",".join([unit] * count) + suffix


def events_body(event: bytes, count: int) -> bytes:
    """A batch of ``count`` copies of the event ``event`` (JSON text), with a batch timestamp."""
    return b'{"timestamp":1.5,"events":[' + b",".join([event] * count) + b"]}"


def written_lines(capfd: pytest.CaptureFixture[str]) -> list[bytes]:
    """The lines the service wrote to stdout since the last call, each checked to be JSON."""
    out = capfd.readouterr().out.encode()
    lines = out.splitlines()
    for line in lines:
        orjson.loads(line)
    return lines


@pytest.mark.parametrize("name", EXPANDING)
def test_no_line_is_longer_than_the_limit_plus_the_allowance(capfd, name):
    """Whatever escaping and rewriting do to an event, its line stays within MAX_EVENT_BYTES + 2 KiB.

    With the Heroku advice's MAX_EVENT_BYTES of 7900, events of every size up to the limit as
    sent: those whose line would pass the limit are rejected in `rejected`, not written long
    (before, 9000 bytes of U+0085 made a 27 KB line), and the others are written.
    """
    client = create_app({"TESTING": True, "MAX_EVENT_BYTES": 7900}).test_client()
    sizes = range(500, 7901, 500)
    body = b'{"timestamp":1.5,"events":[' + b",".join(expanding_event(name, size) for size in sizes) + b"]}"
    response = send(client, body)
    assert response.status_code == 200, response.json
    lines = written_lines(capfd)
    assert len(lines) == response.json["received"] > 0
    assert {error for entry in response.json["rejected"] for error in entry["errors"]["_schema"]} == {
        "Event is larger than 7900 bytes as JSON."
    }
    for line in lines:
        assert len(line) <= 7900 + CONTEXT_ALLOWANCE
        assert len(line) <= 10_000  # Heroku's router cuts longer lines
        assert orjson.loads(line)["request_id"] == LONGEST_REQUEST_ID


@pytest.mark.parametrize("name", [*EXPANDING, "tiny"])
def test_log_bytes_per_body_byte(capfd, name):
    """A request writes at most 4 bytes per decompressed body byte, plus 2 KiB per accepted event.

    Each body is as large as the service takes (MAX_BODY_BYTES), made of the events that grow
    the most when written, or of the smallest events there are (each line's context then weighs most).
    """
    client = create_app({"TESTING": True}).test_client()
    if name == "tiny":
        event, count = b'{"type":"a","timestamp":0.5}', Config.MAX_EVENTS
    else:
        event = expanding_event(name, Config.MAX_EVENT_BYTES // 4)
        count = (MAX_BODY - 64) // (len(event) + 1)
    body = events_body(event, count)
    assert len(body) <= MAX_BODY
    response = send(client, body)
    assert (response.status_code, response.json) == (200, {"success": True, "received": count})
    lines = written_lines(capfd)
    assert len(lines) == count
    assert sum(len(line) + 1 for line in lines) <= GROWTH * len(body) + CONTEXT_ALLOWANCE * count


def per_event(event: bytes) -> bytes:
    """A full body of copies of ``event``, at most MAX_EVENTS of them."""
    return events_body(event, min(Config.MAX_EVENTS, (MAX_BODY - 64) // (len(event) + 1)))


# The costliest bodies found, each at most MAX_BODY_BYTES: most containers per byte, as an
# ignored part, inside a payload, in many accepted events, deeply nested, in invalid events.
WORST_BODIES = {
    "arrays_beside_the_events": fill(b'{"events":[{"type":"a"}],"x":[', b"[]", b"]}"),
    "arrays_in_one_payload": fill(b'{"events":[{"type":"a","payload":{"x":[', b"[]", b"]}}]}"),
    "arrays_in_every_payload": per_event(b'{"type":"a","payload":{"x":[' + b",".join([b"[0]"] * 250) + b"]}}"),
    "objects_in_every_payload": per_event(b'{"type":"a","payload":{"x":[' + b",".join([b"{}"] * 340) + b"]}}"),
    "deep_payloads": per_event(b'{"type":"a","payload":{"x":' + b"[" * 250 + b"]" * 250 + b"}}"),
    "many_keys": per_event(b'{"type":"a","payload":{' + b",".join(b'"k%d":0' % i for i in range(120)) + b"}}"),
    # Keys made to be slow to check for secret words, never seen before: long ones, and many short ones.
    "slow_long_keys": events_body(b'{"type":"a","payload":{"' + b"aP" * 15000 + b'":0}}', 32),
    "slow_short_keys": b'{"events":['
    + b",".join(
        b'{"type":"a","payload":{' + b",".join(b'"%s%05d":0' % (b"aP" * 27, e * 20 + k) for k in range(20)) + b"}}"
        for e in range(720)
    )
    + b"]}",
    "invalid_events": per_event(b'{"type":1,"payload":{"x":[' + b",".join([b"[0]"] * 250) + b"]}}"),
    "unknown_fields": per_event(b'{"type":"a","zz":[' + b",".join([b"[0]"] * 250) + b"]}"),
    # marshmallow explains every field it is handed: this cost 11 valid batches until it was handed ten at most.
    "many_unknown_fields": per_event(b'{"type":"a",' + b",".join(b'"k%d":0' % i for i in range(120)) + b"}"),
    "escapes": fill(b'{"events":[{"type":"a"}],"x":[', b'"\\u0085\\u0000"', b"]}"),
}


def test_no_body_costs_more_than_a_few_valid_batches(capfd):
    """The worst body costs at most a few times the CPU of a valid 1000-event batch, measured in the same run.

    Before, 1 MiB of nested empty arrays (2 KB of gzip) cost about 40 valid batches: the cycle
    collector traversed the hundreds of thousands of fresh lists again and again while they were
    parsed. Medians of interleaved runs, CPU time rather than wall time, so other load matters less.
    """
    client = create_app({"TESTING": True}).test_client()
    for name, body in WORST_BODIES.items():
        assert len(body) <= MAX_BODY, name
        assert client.post("/api/analytics", data=body).status_code in (200, 400), name
    ratios = cpu_over_valid(capfd, {name: (client, body) for name, body in WORST_BODIES.items()})
    assert max(ratios.values()) <= WORST_OVER_VALID, ratios


def test_redaction_does_not_lengthen_a_line_past_the_limit(capfd):
    """Redaction writes "[REDACTED]", 11 bytes longer than a 0: an event within MAX_EVENT_BYTES as sent but not once
    redacted is rejected with the size error, not written long; one that still fits is written within the limit."""
    client = create_app({"TESTING": True, "MAX_EVENT_BYTES": 9000}).test_client()

    def secrets_event(sent_bytes: int) -> bytes:
        return fill(b'{"type":"a","payload":{"a":[', b'{"pwd":0}', b"]}}", sent_bytes)

    body = b'{"events":[' + secrets_event(8990) + b"," + secrets_event(3000) + b"]}"
    response = send(client, body)
    assert (response.status_code, response.json["received"]) == (200, 1)
    too_large = {"_schema": ["Event is larger than 9000 bytes as JSON."]}
    assert response.json["rejected"] == [{"index": 0, "errors": too_large}]
    (line,) = written_lines(capfd)
    assert len(line) <= 9000 + CONTEXT_ALLOWANCE
    assert set(orjson.loads(line)["payload"]["a"][0].values()) == {"[REDACTED]"}


def test_an_invalid_event_names_ten_of_its_unknown_fields():
    """An event with more than ten unknown fields is explained by the first ten sent, so the answer stays smaller
    than the body; one with ten names them all."""
    client = create_app({"TESTING": True}).test_client()
    body = WORST_BODIES["many_unknown_fields"]
    response = send(client, body)
    assert response.status_code == 400
    rejected = response.json["rejected"]
    assert len(rejected) == body.count(b'"type"')
    assert all(entry["errors"] == {f"k{i}": ["Unknown field."] for i in range(10)} for entry in rejected)
    assert len(response.data) < len(body)
    event = {"type": "a", **{f"u{i}": i for i in range(10)}, "id": 7}
    response = send(client, orjson.dumps({"events": [event]}))
    assert response.json["rejected"] == [
        {"index": 0, "errors": {"id": ["Not a valid string."], **{f"u{i}": ["Unknown field."] for i in range(10)}}}
    ]
