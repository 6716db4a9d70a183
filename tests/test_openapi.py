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

from analytics.eventlog import EventLog, LockedWriter
from analytics.schemas import BatchSchema, EventSchema
from app import create_app
from tests.harness.lines import strict_json
from tests.harness.openapi import DRAFT_2020_12, SHARED_RESPONSES, assert_matches, documented, resolve
from tests.harness.wsgi import stalled_body_request

ONE = b'{"events":[{"type":"page_view"}]}'
PREFLIGHT = {"Origin": "https://example.com", "Access-Control-Request-Method": "POST"}

# Every operation and status the document must state, as the contract (issue 2) has them.
EXPECTED_OPERATIONS = {
    ("/api/analytics", "post"): {"200", "400", "408", "413", "415", "500"},
    ("/api/analytics", "options"): {"204"},
    ("/healthz", "get"): {"200"},
    ("/api/openapi.json", "get"): {"200"},
}


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
    """Each operation lists exactly the contract's statuses; every response but the preflight's has a JSON body."""
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
            assert ("content" in definition) == (status != "204"), (path, method, status)
    for status in SHARED_RESPONSES:
        definition = documented(doc, "/any", "put", status)
        assert set(definition["content"]) == {"application/json"}
        assert "X-Request-ID" in definition["headers"]
    assert resolve(doc, documented(doc, "/healthz", "put", 405)["headers"]["Allow"])["required"] is True


def test_request_body_is_the_batch_schema_in_every_content_type(doc):
    """JSON, text/plain (sendBeacon) and form-urlencoded (curl -d) all take the Batch; gzip is a declared encoding."""
    post = doc["paths"]["/api/analytics"]["post"]
    content = post["requestBody"]["content"]
    assert set(content) == {"application/json", "text/plain", "application/x-www-form-urlencoded"}
    assert {media["schema"]["$ref"] for media in content.values()} == {"#/components/schemas/Batch"}
    encoding = next(p for p in post["parameters"] if p["name"] == "Content-Encoding")
    assert encoding["in"] == "header" and "gzip" in encoding["schema"]["enum"]
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
    assert [form["type"] for form in event["properties"]["timestamp"]["anyOf"]] == ["string", "number", "null"]
    assert batch["properties"]["events"]["items"] == {"$ref": "#/components/schemas/Event"}
    # A custom field apispec was not taught about would come out with no type at all.
    for name, prop in [*event["properties"].items(), *batch["properties"].items()]:
        assert "type" in prop or "anyOf" in prop, name


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


def _broken_log_app() -> Flask:
    """An app whose stdout is a pipe with no reader: every write fails, as when the log router dies."""
    app = create_app({"TESTING": True})
    read_end, write_end = os.pipe()
    os.close(read_end)
    app.extensions["analytics"].event_log = EventLog(LockedWriter(write_end, timeout=1.0))
    app.extensions["test_fd"] = write_end
    return app


def _crashing_app() -> Flask:
    """An app whose ingestion has a bug (an uncaught exception), with TESTING off as in production."""
    app = create_app()

    def crash(events: Any) -> Any:
        raise RuntimeError("a bug")

    app.extensions["analytics"].check = crash
    return app


GZIPPED = {"data": gzip.compress(ONE), "headers": {"Content-Encoding": "gzip"}}
# (id, path, method, request kwargs, expected status, expected body or None for the preflight)
REQUESTS: list[tuple[str, str, str, dict[str, Any], int, Any]] = [
    ("accepted", "/api/analytics", "POST", {"data": ONE}, 200, {"success": True, "received": 1}),
    (
        "accepted-text-plain",
        "/api/analytics",
        "POST",
        {"data": ONE, "content_type": "text/plain"},
        200,
        {"success": True, "received": 1},
    ),
    (
        "accepted-form",
        "/api/analytics",
        "POST",
        {"data": ONE, "content_type": "application/x-www-form-urlencoded"},
        200,
        {"success": True, "received": 1},
    ),
    ("accepted-gzip", "/api/analytics", "POST", GZIPPED, 200, {"success": True, "received": 1}),
    ("empty-batch", "/api/analytics", "POST", {"data": b'{"events":[]}'}, 200, {"success": True, "received": 0}),
    (
        "partly-rejected",
        "/api/analytics",
        "POST",
        {"data": b'{"events":[{"type":"a"},{"type":"b","x":1,"id":"e2"}]}'},
        200,
        {"success": True, "received": 1, "rejected": [{"index": 1, "id": "e2", "errors": {"x": ["Unknown field."]}}]},
    ),
    ("invalid-json", "/api/analytics", "POST", {"data": b"{"}, 400, {"error": "Invalid JSON"}),
    (
        "truncated-gzip",
        "/api/analytics",
        "POST",
        {"data": gzip.compress(ONE)[:-8], "headers": {"Content-Encoding": "gzip"}},
        400,
        {"error": "Invalid JSON"},
    ),
    ("not-an-object", "/api/analytics", "POST", {"data": b"[]"}, 400, {"error": "Invalid events"}),
    ("events-not-array", "/api/analytics", "POST", {"data": b'{"events":{}}'}, 400, {"error": "Invalid events"}),
    (
        "all-rejected",
        "/api/analytics",
        "POST",
        {"data": b'{"events":[{"type":""}]}'},
        400,
        {
            "error": "Invalid events",
            "rejected": [{"index": 0, "errors": {"type": ["Length must be between 1 and 256."]}}],
        },
    ),
    (
        "invalid-timestamp",
        "/api/analytics",
        "POST",
        {"data": b'{"events":[],"timestamp":"soon"}'},
        400,
        {"error": "Invalid timestamp"},
    ),
    ("get-ingest", "/api/analytics", "GET", {}, 405, {"error": "Method not allowed"}),
    ("delete-health", "/healthz", "DELETE", {}, 405, {"error": "Method not allowed"}),
    ("post-openapi", "/api/openapi.json", "POST", {"data": ONE}, 405, {"error": "Method not allowed"}),
    ("unknown-path", "/api/nothing", "GET", {}, 404, {"error": "Not found"}),
    (
        "body-too-large",
        "/api/analytics",
        "POST",
        {"data": b" " * (1024 * 1024 + 1)},
        413,
        {"error": "Payload too large", "limit_bytes": 1024 * 1024},
    ),
    (
        "too-many-events",
        "/api/analytics",
        "POST",
        {"data": b'{"events":[' + b",".join([b"{}"] * 1001) + b"]}"},
        413,
        {"error": "Too many events", "limit_events": 1000},
    ),
    (
        "brotli",
        "/api/analytics",
        "POST",
        {"data": ONE, "headers": {"Content-Encoding": "br"}},
        415,
        {"error": "Unsupported Content-Encoding", "supported": ["gzip", "identity"]},
    ),
    ("preflight", "/api/analytics", "OPTIONS", {"headers": PREFLIGHT}, 204, None),
    ("health", "/healthz", "GET", {}, 200, {"status": "ok"}),
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


def test_failed_log_write_is_the_documented_500(doc):
    """The event log failing (stdout a pipe nobody reads) is a 500 whose body the document describes."""
    app = _broken_log_app()
    try:
        response = app.test_client().post("/api/analytics", data=ONE)
    finally:
        os.close(app.extensions["test_fd"])
    assert (response.status_code, strict_json(response.data)) == (500, {"error": "Failed to process events"})
    assert_matches(doc, "/api/analytics", "POST", response)


def test_uncaught_exception_is_the_documented_500(doc):
    """A bug in the service (an uncaught exception, TESTING off) is a 500 whose body the document describes."""
    response = _crashing_app().test_client().post("/api/analytics", data=ONE)
    assert (response.status_code, strict_json(response.data)) == (500, {"error": "Internal server error"})
    assert_matches(doc, "/api/analytics", "POST", response)


def test_stalled_body_is_the_documented_408(doc):
    """The 408 of a body that stops arriving matches the document."""
    client = create_app({"TESTING": True, "BODY_READ_TIMEOUT": 0.2}).test_client()
    response = stalled_body_request(client)
    assert (response.status_code, strict_json(response.data)) == (408, {"error": "Request timeout"})
    assert_matches(doc, "/api/analytics", "POST", response)


def test_table_covers_every_documented_status(doc):
    """The requests above produce every status the document lists (408 and 500 by the tests above)."""
    produced = {(path, method.lower(), str(status)) for _, path, method, _, status, _ in REQUESTS}
    produced |= {
        ("/api/analytics", "post", "408"),
        ("/api/analytics", "post", "500"),
        ("/api/openapi.json", "get", "200"),
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
