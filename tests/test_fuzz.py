"""Fuzzing: hypothesis through the Flask test client, schemathesis against real gunicorn.

Bounded for CI. Run longer by hand with, for example,
``FUZZ_EXAMPLES=20000 SCHEMATHESIS_EXAMPLES=2000 .venv/bin/python -m pytest tests/test_fuzz.py``.
"""

import codecs
import functools
import gzip
import json
import os
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import hypothesis
import orjson
import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.transport.requests import REQUESTS_TRANSPORT

from app import create_app
from tests import strategies
from tests.harness.gunicorn import Server
from tests.harness.lines import parse_lines, strict_json
from tests.harness.openapi import assert_matches

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
SCHEMATHESIS_EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Small limits, so that fuzzing reaches every one of them.
SMALL = {"TESTING": True, "MAX_BODY_BYTES": 4096, "MAX_EVENTS": 8, "MAX_EVENT_BYTES": 300}
CONTENT_TYPES = [None, "application/json", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded"]
ERRORS = {
    400: {"Invalid JSON", "Invalid events", "Invalid timestamp"},
    413: {"Payload too large", "Too many events"},
    415: {"Unsupported Content-Encoding"},
}

# Strings and keys with every awkward character; integers past 64 bits, which orjson reads as doubles.
json_values = strategies.json_values(
    strategies.awkward_text, st.integers(min_value=-(2**70), max_value=2**70), max_size=5, max_leaves=20
)
near_valid_batches = st.fixed_dictionaries(
    {"events": st.lists(strategies.events(json_values, strategies.awkward_text), max_size=12)},
    optional={"timestamp": strategies.timestamps, "extra": json_values},
)


@st.composite
def encoded(draw: st.DrawFn, values: st.SearchStrategy[Any]) -> bytes:
    """A JSON value as a client might send it: ASCII-escaped or raw UTF-8 (lone surrogates make that invalid)."""
    value = draw(values)
    text = json.dumps(value, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")


def send(app: Flask, capfd: pytest.CaptureFixture[bytes], body: bytes, content_type: str | None, zipped: bool) -> None:
    """POST ``body`` and check the answer and the event lines against each other and the document."""
    headers = {"Content-Type": content_type} if content_type else {}
    wire = body
    if zipped:
        wire = gzip.compress(body, compresslevel=1)
        headers["Content-Encoding"] = "gzip"
    capfd.readouterr()
    response = app.test_client().post("/api/analytics", data=wire, headers=headers)
    out = capfd.readouterr().out
    assert response.status_code < 500, response.data
    assert response.mimetype == "application/json"
    answer = strict_json(response.data)
    hypothesis.event(f"{response.status_code} {answer.get('error', '')}".strip())
    assert_matches(app.extensions["fuzz_doc"], "/api/analytics", "POST", response)
    # Only "\n" ends a line: any other line break inside a string must have been escaped.
    lines = parse_lines(out)
    if response.status_code != 200:
        assert answer["error"] in ERRORS[response.status_code]
        assert lines == []
        return
    events = orjson.loads(body.removeprefix(codecs.BOM_UTF8))["events"]
    rejected = answer.get("rejected", [])
    assert answer["received"] + len(rejected) == len(events)
    assert len(lines) == answer["received"]
    rejected_indexes = [entry["index"] for entry in rejected]
    assert rejected_indexes == sorted(set(rejected_indexes))
    accepted = [event for index, event in enumerate(events) if index not in set(rejected_indexes)]
    assert [line["type"] for line in lines] == [event["type"] for event in accepted]
    assert {line["request_id"] for line in lines} <= {response.headers["X-Request-ID"]}
    assert all(line["kind"] == "event" for line in lines)


@functools.cache
def fuzz_app(small: bool) -> Flask:
    """An app with the small limits or the defaults, built once, carrying its document for checking responses."""
    app = create_app(SMALL if small else {"TESTING": True})
    app.extensions["fuzz_doc"] = strict_json(app.test_client().get("/api/openapi.json").data)
    return app


@FUZZ
@given(body=st.binary(max_size=600), content_type=st.sampled_from(CONTENT_TYPES), zipped=st.booleans())
def test_arbitrary_bytes(capfdbinary, body, content_type, zipped):
    """Any bytes at all: never a 5xx, always a documented JSON answer, nothing written unless accepted."""
    send(fuzz_app(small=True), capfdbinary, body, content_type, zipped)


@FUZZ
@given(body=encoded(json_values), content_type=st.sampled_from(CONTENT_TYPES), zipped=st.booleans())
def test_arbitrary_json_values(capfdbinary, body, content_type, zipped):
    """Any JSON value, with awkward strings and numbers past 64 bits: the same guarantees."""
    send(fuzz_app(small=False), capfdbinary, body, content_type, zipped)


@FUZZ
@given(body=encoded(near_valid_batches), content_type=st.sampled_from(CONTENT_TYPES), zipped=st.booleans())
def test_near_valid_batches(capfdbinary, body, content_type, zipped):
    """Batches of mostly valid events at small limits: received + rejected = len(events), one line per accepted."""
    send(fuzz_app(small=True), capfdbinary, body, content_type, zipped)


# --- schemathesis against the real gunicorn process ---------------------------------------------


@pytest.fixture(scope="module")
def gunicorn(start_module_server: Callable[..., Server]) -> Server:
    """Real gunicorn with two workers, for the whole module."""
    return start_module_server(workers=2)


def _json_body(ctx: schemathesis.SerializationContext, value: Any) -> dict[str, Any]:
    """Every request media type of this API carries JSON; gzip it when the case says Content-Encoding: gzip."""
    data = value if isinstance(value, bytes) else json.dumps(value).encode("utf-8", "surrogatepass")
    encoding = {key.lower(): value for key, value in (ctx.case.headers or {}).items()}.get("content-encoding")
    if isinstance(encoding, str) and encoding.strip().lower() in ("gzip", "x-gzip"):
        data = gzip.compress(data)
    return {"data": data}


@pytest.fixture(scope="module")
def api_schema(gunicorn: Server) -> Iterator[Any]:
    """The document gunicorn serves, loaded by schemathesis, with JSON bodies for every request media type."""
    media_types = ("application/json", "text/plain", "application/x-www-form-urlencoded")
    saved = {media_type: REQUESTS_TRANSPORT.get_first_matching_media_type(media_type) for media_type in media_types}
    REQUESTS_TRANSPORT.serializer(*media_types)(_json_body)
    yield schemathesis.openapi.from_url(gunicorn.url + "/api/openapi.json")
    for media_type, pair in saved.items():
        if pair is not None:
            REQUESTS_TRANSPORT.serializer(media_type)(pair[1])


CONFORMANCE = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
OPERATIONS = [
    ("/api/analytics", "POST"),
    ("/api/analytics", "OPTIONS"),
    ("/healthz", "GET"),
    ("/api/openapi.json", "GET"),
]


def _sent_events(request: Any) -> list[Any]:
    """The events of the batch a prepared request carried (gunzipped when it was sent gzipped)."""
    body = request.body if isinstance(request.body, bytes) else (request.body or "").encode()
    if request.headers.get("Content-Encoding", "").strip().lower() in ("gzip", "x-gzip"):
        body = gzip.decompress(body)
    return orjson.loads(body.removeprefix(codecs.BOM_UTF8))["events"]


# schemathesis.pytest.from_fixture would read the document lazily, but with pytest 9 it fails
# ('Function' object has no attribute '_nodeid'), so each operation's strategy is driven by hand.
@pytest.mark.parametrize(("path", "method"), OPERATIONS)
def test_gunicorn_answers_as_documented(api_schema, gunicorn, path, method):
    """Generated and mutated requests to real gunicorn: no 5xx, every response as the document says."""
    operation = api_schema[path][method]
    cases = st.one_of(
        operation.as_strategy(schemathesis.GenerationMode.POSITIVE),
        operation.as_strategy(schemathesis.GenerationMode.NEGATIVE),
    )

    @settings(max_examples=SCHEMATHESIS_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def check(case: schemathesis.Case) -> None:
        start = gunicorn.fence()
        response = case.call_and_validate(checks=CONFORMANCE)
        lines = gunicorn.lines_since(start)
        if method == "POST" and response.status_code == 200:
            answer = response.json()
            assert answer["received"] + len(answer.get("rejected", [])) == len(_sent_events(response.request))
            assert len(lines) == answer["received"]
            assert {line["request_id"] for line in lines} <= set(response.headers["x-request-id"])
        else:
            assert lines == []

    check()


def test_gunicorn_serves_the_document_the_factory_builds(gunicorn):
    """The document gunicorn serves is the one create_app builds with the same settings."""
    with urllib.request.urlopen(gunicorn.url + "/api/openapi.json", timeout=10) as response:
        served = strict_json(response.read())
    assert served == strict_json(create_app().test_client().get("/api/openapi.json").data)
