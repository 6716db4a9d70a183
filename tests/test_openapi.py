"""The OpenAPI document: valid, complete, generated from the schemas, and true of every real response."""

import gzip
import os
import re
from collections.abc import Iterator
from typing import Any

import jsonschema_rs
import pytest
import schemathesis
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import given, settings
from hypothesis import strategies as st

from analytics import messages
from analytics.schemas import BatchSchema, EventSchema
from analytics.timestamps import parse_timestamp
from app import create_app, register_extensions
from tests.harness.gunicorn import free_port
from tests.harness.lines import strict_json
from tests.harness.openapi import (
    DRAFT_2020_12,
    SHARED_RESPONSES,
    assert_matches,
    documented,
    resolve,
    schema_validator,
)
from tests.harness.wsgi import stalled_body_request

ONE = b'{"events":[{"type":"page_view"}]}'
PREFLIGHT = {"Origin": "https://example.com", "Access-Control-Request-Method": "POST"}
ALLOWED_ORIGIN = "https://shop.example"

# Every operation and status the document must state, as the contract has them.
EXPECTED_OPERATIONS = {
    ("/api/analytics", "post"): {"200", "400", "403", "408", "413", "415", "500", "503"},
    ("/api/analytics", "options"): {"204", "403"},
    ("/api/openapi.json", "get"): {"200", "403"},
    ("/api/tracking-plan", "get"): {"200", "403"},
    ("/healthz", "get"): {"200"},
    ("/readyz", "get"): {"200", "503"},
    ("/analytics.js", "get"): {"200", "302", "304"},
    ("/demo", "get"): {"200"},
}
# The responses without a body.
EMPTY = {("/api/analytics", "options", "204"), ("/analytics.js", "get", "304")}


def schema_objects(node: Any, where: str = "#") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every Schema Object: the component schemas and the ``schema`` of each parameter, header and media type."""
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{where}/{key}"
            if key == "schema" and isinstance(value, dict):
                yield here, value
            elif where == "#/components/schemas":
                yield here, value
            else:
                yield from schema_objects(value, here)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from schema_objects(value, f"{where}/{index}")


def refs(node: Any) -> Iterator[str]:
    """Every ``$ref`` anywhere in the document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


@pytest.fixture
def doc(client: FlaskClient) -> dict[str, Any]:
    """The document as the app serves it."""
    response = client.get("/api/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    return strict_json(response.data)


def test_served_document_is_valid_openapi_3_1(doc):
    """schemathesis validates it against the OpenAPI 3.1 meta-schema and loads every operation."""
    assert doc["openapi"] == "3.1.0"
    schema = schemathesis.openapi.from_dict(doc)
    schema.validate()
    operations = {(op.path, op.method.lower()) for op in (result.ok() for result in schema.get_all_operations())}
    assert operations == set(EXPECTED_OPERATIONS)


def test_every_schema_object_is_valid_json_schema(doc):
    """The OpenAPI 3.1 meta-schema leaves Schema Objects unchecked, so each is checked against JSON Schema 2020-12."""
    found = list(schema_objects(doc))
    assert len(found) > 20
    for where, schema in found:
        assert jsonschema_rs.meta.is_valid({"$schema": DRAFT_2020_12, **schema}), where


def test_every_ref_resolves(doc):
    """No dangling ``$ref``: each points at something in the document."""
    targets = set(refs(doc))
    assert "#/components/schemas/Event" in targets
    for ref in targets:
        assert isinstance(resolve(doc, {"$ref": ref}), dict), ref


def test_every_path_method_and_status_of_the_contract(doc):
    """Each operation lists exactly the contract's statuses, each with X-Request-ID, and a body where one is sent."""
    operations = {
        (path, method): set(operation["responses"])
        for path, item in doc["paths"].items()
        for method, operation in item.items()
        if method != "parameters"
    }
    assert operations == EXPECTED_OPERATIONS
    for (path, method), statuses in EXPECTED_OPERATIONS.items():
        for status in statuses:
            definition = documented(doc, path, method, int(status))
            assert resolve(doc, definition["headers"]["X-Request-ID"])["required"] is True
            assert ("content" in definition) == ((path, method, status) not in EMPTY), (path, method, status)
    for status in SHARED_RESPONSES:
        definition = documented(doc, "/any", "put", status)
        assert set(definition["content"]) == {"application/json"}
        assert "X-Request-ID" in definition["headers"]
    assert resolve(doc, documented(doc, "/healthz", "put", 405)["headers"]["Allow"])["required"] is True


def test_request_body_is_the_batch_as_json_or_as_json_text(doc):
    """application/json is the Batch; text/plain (sendBeacon) a string holding its JSON text; gzip is described."""
    post = doc["paths"]["/api/analytics"]["post"]
    content = post["requestBody"]["content"]
    assert content == {
        "application/json": {"schema": {"$ref": "#/components/schemas/Batch"}},
        "text/plain": {
            "schema": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": {"$ref": "#/components/schemas/Batch"},
            }
        },
    }
    # No Content-Encoding parameter: it would say a gzip header goes with any body of the schema.
    assert [resolve(doc, parameter)["name"] for parameter in post["parameters"]] == ["Origin"]
    description = post["requestBody"]["description"]
    assert "`Content-Encoding: gzip` (or `x-gzip`)" in description and "415" in description
    assert "application/x-www-form-urlencoded" in description
    request_id = resolve(doc, doc["paths"]["/api/analytics"]["parameters"][0])
    assert (request_id["name"], request_id["in"]) == ("X-Request-ID", "header")


def test_request_schemas_come_from_marshmallow(doc):
    """Event and Batch carry the marshmallow fields, required keys and unknown-field policy of analytics.schemas."""
    schemas = doc["components"]["schemas"]
    event, batch = schemas["Event"], schemas["Batch"]
    assert set(event["properties"]) == set(EventSchema(max_bytes=1).fields)
    assert set(batch["properties"]) == set(BatchSchema().fields)
    assert event["required"] == ["type"] and batch["required"] == ["events"]
    # RAISE on the event: an unknown field makes it invalid. EXCLUDE on the batch: other keys are ignored.
    assert event["additionalProperties"] is False
    assert "additionalProperties" not in batch
    assert (event["properties"]["type"]["minLength"], event["properties"]["type"]["maxLength"]) == (1, 256)
    assert event["properties"]["id"]["maxLength"] == 128
    assert event["properties"]["userId"]["type"] == ["string", "null"]
    forms = [form["type"] for form in event["properties"]["timestamp"]["anyOf"]]
    assert forms == ["string", "number", "number", "null"]
    # Each element is checked on its own: a 200 needs one valid event (or none at all), not every element valid.
    events = batch["properties"]["events"]
    assert "items" not in events
    assert events["anyOf"] == [{"maxItems": 0}, {"contains": {"$ref": "#/components/schemas/Event"}}]
    # A custom field apispec was not taught about would come out with no type at all.
    for name, prop in [*event["properties"].items(), *batch["properties"].items()]:
        assert "type" in prop or "anyOf" in prop, name


@pytest.mark.parametrize(
    ("events", "status"),
    [
        ([], 200),
        ([{"type": "a"}], 200),
        ([{"type": "a"}, {"type": ""}, None, 7], 200),
        ([{"type": ""}, None], 400),
        ([None], 400),
    ],
)
def test_events_schema_says_when_the_batch_is_accepted(client, capfd, doc, events, status):
    """The `events` schema is valid exactly for the arrays the service answers with a 200 (invalid elements and all)."""
    validator = schema_validator(doc, {"$ref": "#/components/schemas/Batch"})
    response = client.post("/api/analytics", json={"events": events})
    assert response.status_code == status
    assert validator.is_valid({"events": events}) == (status == 200)
    capfd.readouterr()


@pytest.fixture(scope="module")
def timestamp_schema() -> jsonschema_rs.Validator:
    """A validator for an event's `timestamp` as the app documents it, checking `format` too (schemathesis
    generates by it)."""
    doc = strict_json(create_app({"TESTING": True}).test_client().get("/api/openapi.json").data)
    schema = doc["components"]["schemas"]["Event"]["properties"]["timestamp"]
    return jsonschema_rs.validator_for({"$schema": DRAFT_2020_12, **schema}, validate_formats=True)


def accepted(value: Any) -> bool:
    """Whether the service takes ``value`` as a timestamp."""
    try:
        parse_timestamp(value)
    except ValueError:
        return False
    return True


FIRST_SECOND = -62135596800  # 0001-01-01T00:00:00Z
END_MILLISECOND = 253402300800000  # 10000-01-01T00:00:00Z
# Unix times at each bound of each documented range, and either side of it.
EDGE_NUMBERS = [
    *(FIRST_SECOND + delta for delta in (-1, -0.5, 0, 0.5)),
    *(10**11 + delta for delta in (-1, -0.001, 0, 1)),
    *(END_MILLISECOND + delta for delta in (-1, -0.5, 0, 1)),
    *(-(10**11) + delta for delta in (-1, 0, 1)),
    *(FIRST_SECOND * 1000 + delta for delta in (-1, 0, 1)),
    0,
    1716215520,
    1716215520000,
    1e308,
    -1e308,
]


@pytest.mark.parametrize("value", EDGE_NUMBERS)
def test_timestamp_numbers_documented_are_those_accepted(timestamp_schema, value):
    """At every edge of the documented number ranges, the document and the service agree."""
    assert timestamp_schema.is_valid(value) == accepted(value)


@settings(max_examples=300, deadline=None)
@given(value=st.integers(min_value=-(10**16), max_value=10**16) | st.floats(allow_nan=False, allow_infinity=False))
def test_timestamp_numbers_agree_everywhere(timestamp_schema, value):
    """Any number: documented valid exactly when the service takes it."""
    assert timestamp_schema.is_valid(value) == accepted(value)


# RFC 3339 date-times, as format: date-time has them (an offset always, Z or ±HH:MM).
offsets = st.just("Z") | st.builds(
    lambda sign, minutes: f"{sign}{minutes // 60:02d}:{minutes % 60:02d}",
    st.sampled_from("+-"),
    st.integers(min_value=0, max_value=23 * 60 + 59),
)
rfc3339 = st.builds(
    lambda moment, fraction, offset: moment.isoformat(timespec="seconds") + fraction + offset,
    st.datetimes(),
    st.just("") | st.integers(min_value=0, max_value=999999).map(lambda micros: f".{micros:06d}"),
    offsets,
)


@settings(max_examples=300, deadline=None)
@given(value=rfc3339 | st.sampled_from(["0001-01-01T00:00:00+05:00", "9999-12-31T23:00:00-05:00"]))
def test_timestamp_strings_documented_are_those_accepted(timestamp_schema, value):
    """An RFC 3339 date-time is documented valid exactly when the service takes it and it is of years 2 to 9998 (the
    service takes some of years 1 and 9999 too, as the description says)."""
    year = int(value[:4])
    assert timestamp_schema.is_valid(value) == (accepted(value) and 2 <= year <= 9998)


@pytest.mark.parametrize(
    ("value", "valid", "taken"),
    [
        ("2024-05-20T14:32:00Z", True, True),
        ("2024-05-20T16:32:00.5+02:00", True, True),
        ("2024-05-20T14:32:00z", False, False),
        ("2024-05-20T23:59:60Z", False, False),
        ("0000-01-01T00:00:00Z", False, False),
        ("0001-01-01T00:00:00+05:00", False, False),
        # Left out of the document, taken by the service (the description says so).
        ("0001-06-01T00:00:00Z", False, True),
        ("2024-05-20T14:32:00", False, True),
        ("2024-05-20", False, True),
    ],
)
def test_timestamp_string_edges(timestamp_schema, value, valid, taken):
    """The string edges the description names."""
    assert (timestamp_schema.is_valid(value), accepted(value)) == (valid, taken)


def test_limits_in_the_document_are_the_apps_settings():
    """An app with other limits documents those limits."""
    app = create_app({"TESTING": True, "MAX_EVENTS": 7, "MAX_BODY_BYTES": 4321, "MAX_EVENT_BYTES": 99})
    doc = strict_json(app.test_client().get("/api/openapi.json").data)
    assert doc["components"]["schemas"]["Batch"]["properties"]["events"]["maxItems"] == 7
    description = doc["paths"]["/api/analytics"]["post"]["requestBody"]["description"]
    assert "4321 bytes" in description and "99 bytes" in description


def test_custom_fields_do_not_leak_into_apispec_defaults():
    """Teaching the plugin about Timestamp and JsonArray changes no global mapping of apispec."""
    from apispec.ext.marshmallow.field_converter import DEFAULT_FIELD_MAPPING

    from analytics.schemas import JsonArray, Timestamp

    assert Timestamp not in DEFAULT_FIELD_MAPPING and JsonArray not in DEFAULT_FIELD_MAPPING


def _app_writing_to(fd: int, **settings: Any) -> Flask:
    """An app whose event log and readiness check write to ``fd`` instead of stdout."""
    app = create_app({"TESTING": True, "LOG_WRITE_TIMEOUT": 1.0, **settings})
    register_extensions(app, stdout=fd)
    return app


@pytest.fixture
def readerless_pipe() -> Iterator[int]:
    """The write end of a pipe nobody reads, as stdout is when the log router has died."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    yield write_end
    os.close(write_end)


def _crashing_app() -> Flask:
    """An app whose ingestion has a bug (an uncaught exception), with TESTING off as in production."""
    app = create_app()

    def crash(events: Any) -> Any:
        raise RuntimeError("a bug")

    app.extensions["ingestor"].check = crash
    return app


def post(data: bytes, **kwargs: Any) -> dict[str, Any]:
    """Request arguments for a POST of ``data``."""
    return {"data": data, **kwargs}


GZIPPED = post(gzip.compress(ONE), headers={"Content-Encoding": "gzip"})
ACCEPTED_ONE = {"success": True, "received": 1}
# (id, path, method, request kwargs, expected status, expected body or None for the preflight)
REQUESTS: list[tuple[str, str, str, dict[str, Any], int, Any]] = [
    ("accepted", "/api/analytics", "POST", post(ONE), 200, ACCEPTED_ONE),
    ("accepted-text-plain", "/api/analytics", "POST", post(ONE, content_type="text/plain"), 200, ACCEPTED_ONE),
    (
        "accepted-form",
        "/api/analytics",
        "POST",
        post(ONE, content_type="application/x-www-form-urlencoded"),
        200,
        ACCEPTED_ONE,
    ),
    ("accepted-gzip", "/api/analytics", "POST", GZIPPED, 200, ACCEPTED_ONE),
    ("empty-batch", "/api/analytics", "POST", post(b'{"events":[]}'), 200, {"success": True, "received": 0}),
    (
        "partly-rejected",
        "/api/analytics",
        "POST",
        post(b'{"events":[{"type":"a"},{"type":"b","x":1,"id":"e2"}]}'),
        200,
        {"success": True, "received": 1, "rejected": [{"index": 1, "id": "e2", "errors": {"x": ["Unknown field."]}}]},
    ),
    ("invalid-json", "/api/analytics", "POST", post(b"{"), 400, {"error": messages.INVALID_JSON}),
    (
        "truncated-gzip",
        "/api/analytics",
        "POST",
        post(gzip.compress(ONE)[:-8], headers={"Content-Encoding": "gzip"}),
        400,
        {"error": messages.INVALID_JSON},
    ),
    ("not-an-object", "/api/analytics", "POST", post(b"[]"), 400, {"error": messages.INVALID_EVENTS}),
    ("events-not-array", "/api/analytics", "POST", post(b'{"events":{}}'), 400, {"error": messages.INVALID_EVENTS}),
    (
        "all-rejected",
        "/api/analytics",
        "POST",
        post(b'{"events":[{"type":""}]}'),
        400,
        {
            "error": messages.INVALID_EVENTS,
            "rejected": [{"index": 0, "errors": {"type": ["Length must be between 1 and 256."]}}],
        },
    ),
    (
        "invalid-timestamp",
        "/api/analytics",
        "POST",
        post(b'{"events":[],"timestamp":"soon"}'),
        400,
        {"error": messages.INVALID_TIMESTAMP},
    ),
    ("get-ingest", "/api/analytics", "GET", {}, 405, {"error": messages.METHOD_NOT_ALLOWED}),
    ("delete-health", "/healthz", "DELETE", {}, 405, {"error": messages.METHOD_NOT_ALLOWED}),
    ("post-openapi", "/api/openapi.json", "POST", post(ONE), 405, {"error": messages.METHOD_NOT_ALLOWED}),
    ("post-script", "/analytics.js", "POST", post(ONE), 405, {"error": messages.METHOD_NOT_ALLOWED}),
    ("unknown-path", "/api/nothing", "GET", {}, 404, {"error": messages.NOT_FOUND}),
    ("unknown-page", "/demo/", "GET", {}, 404, {"error": messages.NOT_FOUND}),
    ("doubled-slash", "/api//analytics", "POST", post(ONE), 404, {"error": messages.NOT_FOUND}),
    (
        "body-too-large",
        "/api/analytics",
        "POST",
        post(b" " * (1024 * 1024 + 1)),
        413,
        {"error": messages.PAYLOAD_TOO_LARGE, "limit_bytes": 1024 * 1024},
    ),
    (
        "too-many-events",
        "/api/analytics",
        "POST",
        post(b'{"events":[' + b",".join([b"{}"] * 1001) + b"]}"),
        413,
        {"error": messages.TOO_MANY_EVENTS, "limit_events": 1000},
    ),
    (
        "too-many-containers",
        "/api/analytics",
        "POST",
        # Counted from above: colons in strings count as keys.
        post(b'{"events":[],"x":"' + b":" * 220_000 + b'"}'),
        413,
        {"error": messages.TOO_MANY_CONTAINERS},
    ),
    (
        "brotli",
        "/api/analytics",
        "POST",
        post(ONE, headers={"Content-Encoding": "br"}),
        415,
        {"error": messages.UNSUPPORTED_ENCODING, "supported": ["gzip", "x-gzip", "identity"]},
    ),
    ("preflight", "/api/analytics", "OPTIONS", {"headers": PREFLIGHT}, 204, None),
    ("health", "/healthz", "GET", {}, 200, {"status": "ok"}),
    ("ready", "/readyz", "GET", {}, 200, {"status": "ready"}),
    ("tracking-plan", "/api/tracking-plan", "GET", {}, 200, {"mode": "off", "unplanned": "allow", "types": {}}),
]


@pytest.mark.parametrize(
    ("path", "method", "kwargs", "status", "expected"),
    [pytest.param(*row[1:], id=row[0]) for row in REQUESTS],
)
def test_real_responses_match_the_document(client, capfd, doc, path, method, kwargs, status, expected):
    """Each status of the contract, produced for real, has the documented headers and body schema."""
    response = client.open(path, method=method, **kwargs)
    assert response.status_code == status
    if expected is None:
        assert response.data == b""
        assert response.headers["Access-Control-Allow-Origin"] == "*"  # CORS_ORIGINS is "*" by default
    else:
        assert strict_json(response.data) == expected
    assert_matches(doc, path, method, response)
    capfd.readouterr()


def test_openapi_response_matches_the_document(client, doc):
    """The document itself is a documented 200 of its own path."""
    response = client.get("/api/openapi.json")
    assert_matches(doc, "/api/openapi.json", "GET", response)


def test_browser_client_responses_match_the_document(client, doc):
    """The script, its redirect from an old version, its 304, and the demo page: as documented, none of them JSON."""
    script = client.get("/analytics.js")
    assert (script.status_code, script.mimetype) == (200, "text/javascript")
    assert_matches(doc, "/analytics.js", "GET", script)
    moved = client.get("/analytics.js?v=0000000000000000")
    assert (moved.status_code, moved.mimetype) == (302, "text/html")
    assert_matches(doc, "/analytics.js", "GET", moved)
    pinned = client.get(moved.headers["Location"])
    assert (pinned.status_code, pinned.data) == (200, script.data)
    unchanged = client.get("/analytics.js", headers={"If-None-Match": script.headers["ETag"]})
    assert (unchanged.status_code, unchanged.data) == (304, b"")
    assert_matches(doc, "/analytics.js", "GET", unchanged)
    page = client.get("/demo")
    assert (page.status_code, page.mimetype) == (200, "text/html")
    assert_matches(doc, "/demo", "GET", page)


def test_head_and_options_answer_as_the_description_says(client, doc):
    """HEAD where GET is listed and OPTIONS on every path are answered, not 405s: the description says so."""
    assert "HEAD where GET is listed and OPTIONS" in doc["info"]["description"]
    head = client.head("/healthz")
    assert (head.status_code, head.data, "X-Request-ID" in head.headers) == (200, b"", True)
    options = client.options("/demo")
    assert (options.status_code, options.data) == (204, b"")
    assert set(options.headers["Allow"].split(", ")) == {"GET", "HEAD", "OPTIONS"}


# Requests from an origin CORS_ORIGINS does not list: (path, method, request kwargs besides the Origin header).
REFUSED_ORIGIN = [
    ("/api/analytics", "POST", post(ONE)),
    ("/api/analytics", "OPTIONS", {"headers": {"Access-Control-Request-Method": "POST"}}),
    ("/api/openapi.json", "GET", {}),
    ("/api/tracking-plan", "GET", {}),
]


@pytest.mark.parametrize(("path", "method", "kwargs"), REFUSED_ORIGIN)
def test_refused_origin_is_the_documented_403(capfd, doc, path, method, kwargs):
    """With CORS_ORIGINS a list, a request from another origin gets the documented 403 and writes nothing."""
    client = create_app({"TESTING": True, "CORS_ORIGINS": [ALLOWED_ORIGIN]}).test_client()
    capfd.readouterr()
    kwargs = {**kwargs, "headers": {"Origin": "https://elsewhere.example", **kwargs.get("headers", {})}}
    response = client.open(path, method=method, **kwargs)
    assert (response.status_code, strict_json(response.data)) == (403, {"error": messages.ORIGIN_NOT_ALLOWED})
    assert_matches(doc, path, method, response)
    assert capfd.readouterr().out == ""


def test_failed_log_write_is_the_documented_500(doc, readerless_pipe):
    """The event log failing (stdout a pipe nobody reads) is a 500 whose body the document describes."""
    response = _app_writing_to(readerless_pipe).test_client().post("/api/analytics", data=ONE)
    assert (response.status_code, strict_json(response.data)) == (500, {"error": messages.LOG_WRITE_FAILED})
    assert_matches(doc, "/api/analytics", "POST", response)


def test_unwritable_stdout_is_the_documented_503(doc, readerless_pipe):
    """/readyz with stdout a pipe nobody reads: the documented 503, its reason saying why."""
    response = _app_writing_to(readerless_pipe).test_client().get("/readyz")
    body = strict_json(response.data)
    assert (response.status_code, body["error"], set(body)) == (503, messages.NOT_READY, {"error", "reason"})
    assert "nothing reads it" in body["reason"]
    assert_matches(doc, "/readyz", "GET", response)


def test_event_store_unavailable_is_the_documented_503(doc):
    """SINKS with nats and no NATS server listening: the documented 503, with Retry-After."""
    app = create_app({"TESTING": True, "SINKS": ["nats"], "NATS_SERVERS": [f"nats://127.0.0.1:{free_port()}"]})
    try:
        response = app.test_client().post("/api/analytics", data=ONE)
    finally:
        app.extensions["jetstream"].close()
    assert (response.status_code, strict_json(response.data)) == (503, {"error": messages.EVENT_STORE_UNAVAILABLE})
    assert response.headers["Retry-After"] == "5"
    assert_matches(doc, "/api/analytics", "POST", response)


def test_uncaught_exception_is_the_documented_500(doc):
    """A bug in the service (an uncaught exception, TESTING off) is a 500 whose body the document describes."""
    response = _crashing_app().test_client().post("/api/analytics", data=ONE)
    assert (response.status_code, strict_json(response.data)) == (500, {"error": messages.INTERNAL_ERROR})
    assert_matches(doc, "/api/analytics", "POST", response)


def test_stalled_body_is_the_documented_408(doc):
    """The 408 of a body that stops arriving matches the document."""
    client = create_app({"TESTING": True, "BODY_READ_TIMEOUT": 0.2}).test_client()
    response = stalled_body_request(client)
    assert (response.status_code, strict_json(response.data)) == (408, {"error": messages.REQUEST_TIMEOUT})
    assert_matches(doc, "/api/analytics", "POST", response)


def test_tests_above_produce_every_documented_status(doc):
    """Between them, the tests above produce every status the document lists, and both shared ones."""
    produced = {(path, method.lower(), str(status)) for _, path, method, _, status, _ in REQUESTS}
    produced |= {
        ("/api/analytics", "post", "408"),
        ("/api/analytics", "post", "500"),
        ("/api/analytics", "post", "503"),
        ("/api/openapi.json", "get", "200"),
        ("/readyz", "get", "503"),
        *(("/analytics.js", "get", status) for status in ("200", "302", "304")),
        ("/demo", "get", "200"),
        *((path, method.lower(), "403") for path, method, _ in REFUSED_ORIGIN),
    }
    documented_statuses = {(p, m, s) for (p, m), statuses in EXPECTED_OPERATIONS.items() for s in statuses}
    assert documented_statuses <= produced
    assert {status for _, _, _, _, status, _ in REQUESTS} >= set(SHARED_RESPONSES)


def test_request_id_pattern_documented_is_the_one_enforced(client, doc):
    """A trusted proxy's X-Request-ID comes back as sent, and matches the documented header pattern."""
    pattern = resolve(doc, {"$ref": "#/components/headers/RequestId"})["schema"]["pattern"]
    response = client.get("/healthz", headers={"X-Request-ID": "req-42:a/b+c=d@e.f"})
    assert response.headers["X-Request-ID"] == "req-42:a/b+c=d@e.f"
    assert re.fullmatch(pattern.strip("^$"), response.headers["X-Request-ID"])
    assert_matches(doc, "/healthz", "GET", response)
