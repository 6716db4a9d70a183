"""Checking a response against the OpenAPI document the service serves: documented status, headers and body."""

from typing import Any

import jsonschema_rs
from werkzeug.test import TestResponse

from tests.harness.lines import strict_json

DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"
# Statuses no listed operation answers, each documented once as a shared response.
SHARED_RESPONSES = {404: "NotFound", 405: "MethodNotAllowed"}


def resolve(doc: dict[str, Any], node: Any) -> Any:
    """Follow a local ``$ref`` (one hop at a time until there is none)."""
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/"), ref
        node = doc
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def schema_validator(doc: dict[str, Any], schema: dict[str, Any]) -> jsonschema_rs.Validator:
    """A JSON Schema 2020-12 validator for ``schema``, its ``#/components/...`` refs resolved in ``doc``."""
    return jsonschema_rs.validator_for({"$schema": DRAFT_2020_12, "components": doc["components"], **schema})


def documented(doc: dict[str, Any], path: str, method: str, status: int) -> dict[str, Any]:
    """The response object the document gives for this operation and status; 404 and 405 are shared ones."""
    if status in SHARED_RESPONSES:
        return resolve(doc, {"$ref": f"#/components/responses/{SHARED_RESPONSES[status]}"})
    responses = doc["paths"][path][method.lower()]["responses"]
    assert str(status) in responses, f"{method} {path} {status} is not documented"
    return resolve(doc, responses[str(status)])


def assert_matches(doc: dict[str, Any], path: str, method: str, response: TestResponse) -> None:
    """The response has the documented headers and content type, and a JSON body valid against the documented schema."""
    definition = documented(doc, path, method, response.status_code)
    for name, header in definition.get("headers", {}).items():
        header = resolve(doc, header)
        value = response.headers.get(name)
        if header.get("required"):
            assert value is not None, f"{name} missing on {method} {path} {response.status_code}"
        if value is not None:
            errors = [error.message for error in schema_validator(doc, header["schema"]).iter_errors(value)]
            assert not errors, f"header {name}={value!r}: {errors}"
    content = definition.get("content")
    if content is None:
        assert response.data == b""
        return
    assert response.mimetype in content
    if response.mimetype != "application/json":
        # The browser client's script and pages: documented as a string, which any body is.
        return
    body = strict_json(response.data)
    errors = [error.message for error in schema_validator(doc, content[response.mimetype]["schema"]).iter_errors(body)]
    assert not errors, f"{method} {path} {response.status_code} {body}: {errors}"
