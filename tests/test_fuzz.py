"""Fuzzing: hypothesis through the Flask test client, schemathesis against real gunicorn.

Bounded for CI. Run longer by hand with, for example,
``FUZZ_EXAMPLES=20000 SCHEMATHESIS_EXAMPLES=2000 .venv/bin/python -m pytest tests/test_fuzz.py``.
"""

import codecs
import functools
import gzip
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hypothesis
import orjson
import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import CHECKS, load_all_checks

from analytics import messages
from app import create_app
from tests import strategies
from tests.harness.gunicorn import ROOT, Server
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
    400: {messages.INVALID_JSON, messages.INVALID_EVENTS, messages.INVALID_TIMESTAMP},
    413: {messages.PAYLOAD_TOO_LARGE, messages.TOO_MANY_EVENTS},
    415: {messages.UNSUPPORTED_ENCODING},
}
# schemathesis's settings for this API (and its hooks), which the CLI finds in the repository too.
SCHEMATHESIS_CONFIG = ROOT / "schemathesis.toml"
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
load_all_checks()
# Every check schemathesis has: those about authentication and links between operations find nothing to check.
ALL_CHECKS = CHECKS.get_all()

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


@pytest.fixture(scope="module")
def api_schema(gunicorn: Server) -> Any:
    """The document gunicorn serves, loaded by schemathesis with the repository's settings and hooks."""
    config = schemathesis.Config.from_path(SCHEMATHESIS_CONFIG)
    return schemathesis.openapi.from_url(gunicorn.url + "/api/openapi.json", config=config)


# Every operation of the document (schemathesis's CLI leaves out OPTIONS and the document's own path).
OPERATIONS = [
    ("/api/analytics", "POST"),
    ("/api/analytics", "OPTIONS"),
    ("/api/openapi.json", "GET"),
    ("/api/tracking-plan", "GET"),
    ("/healthz", "GET"),
    ("/readyz", "GET"),
    ("/analytics.js", "GET"),
    ("/demo", "GET"),
]


def test_every_operation_is_fuzzed(api_schema):
    """OPERATIONS is every operation the served document lists."""
    paths = api_schema.raw_schema["paths"]
    assert {(path, method.upper()) for path, item in paths.items() for method in item if method != "parameters"} == set(
        OPERATIONS
    )


def _sent_events(request: Any) -> list[Any]:
    """The events of the batch a prepared request carried."""
    body = request.body if isinstance(request.body, bytes) else (request.body or "").encode()
    return orjson.loads(body.removeprefix(codecs.BOM_UTF8))["events"]


# schemathesis.pytest.from_fixture would read the document lazily, but with pytest 9 it fails
# ('Function' object has no attribute '_nodeid'), so each operation's strategy is driven by hand.
@pytest.mark.parametrize(("path", "method"), OPERATIONS)
def test_gunicorn_answers_as_documented(api_schema, gunicorn, path, method):
    """Generated and mutated requests to real gunicorn pass every schemathesis check, and the event lines agree.

    Valid requests (by the document) are accepted and invalid ones refused, no 5xx, every response as
    documented; a 200 accounts for every event and each accepted one is a line, other answers write nothing.
    """
    operation = api_schema[path][method]
    cases = st.one_of(
        operation.as_strategy(schemathesis.GenerationMode.POSITIVE),
        operation.as_strategy(schemathesis.GenerationMode.NEGATIVE),
    )

    @settings(max_examples=SCHEMATHESIS_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def check(case: schemathesis.Case) -> None:
        start = gunicorn.fence()
        response = case.call_and_validate(checks=ALL_CHECKS)
        lines = gunicorn.lines_since(start)
        if method == "POST" and response.status_code == 200:
            answer = response.json()
            assert answer["received"] + len(answer.get("rejected", [])) == len(_sent_events(response.request))
            assert len(lines) == answer["received"]
            assert {line["request_id"] for line in lines} <= set(response.headers["x-request-id"])
        else:
            assert lines == []

    check()


def test_schemathesis_cli_with_every_check(gunicorn, tmp_path):
    """The CLI command docs/reliability.md gives (every check, the repository's schemathesis.toml) finds nothing in
    the phase the test above does not run: cases derived from each schema's edges, and methods a path does not list."""
    command = [
        str(SCHEMATHESIS),
        "--config-file",
        str(SCHEMATHESIS_CONFIG),
        "run",
        gunicorn.url + "/api/openapi.json",
        "--checks",
        "all",
        "--phases",
        "examples,coverage",
        "--no-color",
    ]
    # In a directory of its own: schemathesis keeps its caches in the working directory; the hooks module is
    # imported from the repository.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert "No issues found" in result.stdout


def test_gunicorn_serves_the_document_the_factory_builds(gunicorn):
    """The document gunicorn serves is the one create_app builds with the same settings."""
    with urllib.request.urlopen(gunicorn.url + "/api/openapi.json", timeout=10) as response:
        served = strict_json(response.read())
    assert served == strict_json(create_app().test_client().get("/api/openapi.json").data)
