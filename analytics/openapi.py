"""The OpenAPI 3.1 document of the service, built once per app from the marshmallow schemas.

``GET /api/openapi.json`` serves it. The request side comes from
``analytics.schemas`` itself, so the document cannot drift from what is
checked; the response bodies, which the views build as plain dicts, are
described by the documentation-only schemas below and checked against real
responses by tests/test_openapi.py.
"""

from collections.abc import Mapping
from typing import Any

import orjson
from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, Response, current_app
from flask.blueprints import BlueprintSetupState
from marshmallow import RAISE, Schema, fields, validate

from analytics.peers import REQUEST_ID_PATTERN
from analytics.schemas import BatchSchema, EventSchema, JsonArray, Timestamp

OPENAPI_VERSION = "3.1.0"
# What the request body may be sent as: all are parsed as JSON whatever they say.
REQUEST_MEDIA_TYPES = ("application/json", "text/plain", "application/x-www-form-urlencoded")

bp = Blueprint("openapi", __name__)


class _Strict(Schema):
    """A response body: no key besides those listed (additionalProperties false)."""

    class Meta:
        unknown = RAISE


class RejectionSchema(_Strict):
    """One event that was not accepted, and why."""

    index = fields.Integer(
        required=True, validate=validate.Range(min=0), metadata={"description": "Its index in `events`."}
    )
    id = fields.String(metadata={"description": "The event's own `id`, where it had one (a string of up to 128)."})
    errors = fields.Dict(
        required=True,
        metadata={
            "description": "marshmallow's messages: a list of strings per field name, "
            "`_schema` for the event as a whole (too large, too deeply nested, not an object)."
        },
    )


class SuccessSchema(_Strict):
    """200: the valid events are written; the invalid ones, if any, are listed."""

    success = fields.Boolean(required=True, validate=validate.Equal(True))
    received = fields.Integer(
        required=True, validate=validate.Range(min=0), metadata={"description": "How many events were accepted."}
    )
    rejected = fields.List(
        fields.Nested(RejectionSchema),
        validate=validate.Length(min=1),
        metadata={"description": "Present only when some events were invalid: `received` + its length = batch length."},
    )


class InvalidJsonSchema(_Strict):
    """400: the body is not JSON (malformed, not UTF-8, NaN/Infinity, a corrupt or truncated gzip stream)."""

    error = fields.String(required=True, validate=validate.Equal("Invalid JSON"))


class InvalidEventsSchema(_Strict):
    """400: the body is not an object with an `events` array, or every event of the batch is invalid."""

    error = fields.String(required=True, validate=validate.Equal("Invalid events"))
    rejected = fields.List(
        fields.Nested(RejectionSchema),
        validate=validate.Length(min=1),
        metadata={"description": "Present when the batch had events and all were invalid."},
    )


class InvalidTimestampSchema(_Strict):
    """400: the batch `timestamp` is present but neither ISO 8601 nor Unix time."""

    error = fields.String(required=True, validate=validate.Equal("Invalid timestamp"))


class PayloadTooLargeSchema(_Strict):
    """413: the body is over MAX_BODY_BYTES, on the wire or after decompression."""

    error = fields.String(required=True, validate=validate.Equal("Payload too large"))
    limit_bytes = fields.Integer(required=True, validate=validate.Range(min=0))


class TooManyEventsSchema(_Strict):
    """413: the batch holds more than MAX_EVENTS events."""

    error = fields.String(required=True, validate=validate.Equal("Too many events"))
    limit_events = fields.Integer(required=True, validate=validate.Range(min=0))


class RequestTimeoutSchema(_Strict):
    """408: the body stopped arriving for BODY_READ_TIMEOUT seconds."""

    error = fields.String(required=True, validate=validate.Equal("Request timeout"))


class UnsupportedEncodingSchema(_Strict):
    """415: a Content-Encoding other than gzip or identity."""

    error = fields.String(required=True, validate=validate.Equal("Unsupported Content-Encoding"))
    supported = fields.List(fields.String(), required=True)


class NotFoundSchema(_Strict):
    """404: no such path."""

    error = fields.String(required=True, validate=validate.Equal("Not found"))


class MethodNotAllowedSchema(_Strict):
    """405: the path exists, the method does not; the Allow header lists those that do."""

    error = fields.String(required=True, validate=validate.Equal("Method not allowed"))


class ServerErrorSchema(_Strict):
    """500: a fault of ours, never of the request: the client should retry."""

    error = fields.String(
        required=True,
        validate=validate.OneOf(["Failed to process events", "Internal server error"]),
        metadata={"description": "`Failed to process events`: the event log could not take the batch (none written)."},
    )


class HealthSchema(_Strict):
    """200 from /healthz."""

    status = fields.String(required=True, validate=validate.Equal("ok"))


# Every documentation schema, registered under its name without "Schema".
_RESPONSE_SCHEMAS = (
    RejectionSchema,
    SuccessSchema,
    InvalidJsonSchema,
    InvalidEventsSchema,
    InvalidTimestampSchema,
    PayloadTooLargeSchema,
    TooManyEventsSchema,
    RequestTimeoutSchema,
    UnsupportedEncodingSchema,
    NotFoundSchema,
    MethodNotAllowedSchema,
    ServerErrorSchema,
    HealthSchema,
)

TIMESTAMP_FORMS = [
    {
        "type": "string",
        "description": "ISO 8601 (as Python's datetime.fromisoformat reads it), with `Z`, an offset, "
        "or no zone (taken as UTC).",
        "examples": ["2024-05-20T14:32:00Z", "2024-05-20T16:32:00+02:00"],
    },
    {
        "type": "number",
        "description": "Unix time: seconds, or milliseconds for values of 10^11 and more.",
        "examples": [1716215520, 1716215520000],
    },
]


def _custom_fields(max_events: int) -> Any:
    """An apispec attribute function for the two custom fields of analytics.schemas."""

    def custom_field2properties(self: Any, field: fields.Field, **kwargs: Any) -> dict:
        if isinstance(field, Timestamp):
            forms = [*TIMESTAMP_FORMS, {"type": "null"}] if field.allow_none else list(TIMESTAMP_FORMS)
            return {"anyOf": forms}
        if isinstance(field, JsonArray):
            return {
                "type": "array",
                "maxItems": max_events,
                "items": {"$ref": "#/components/schemas/Event"},
                "description": f"At most {max_events} events (more is a 413). Each event is checked on its own: "
                "an invalid one (an unknown field, a wrong type, too large) is listed in `rejected` "
                "while the valid ones are accepted.",
            }
        return {}

    return custom_field2properties


def _json(schema: str | dict) -> dict:
    """A JSON response content whose schema is a component name or an inline schema."""
    return {"application/json": {"schema": schema}}


def _one_of(*names: str) -> dict:
    """A schema matching exactly one of the named components."""
    return {"oneOf": [{"$ref": f"#/components/schemas/{name}"} for name in names]}


def _response(description: str, schema: str | dict | None = None, **headers: str) -> dict:
    """A response object: every response carries X-Request-ID, some more headers."""
    response: dict[str, Any] = {
        "description": description,
        "headers": {"X-Request-ID": "RequestId", **headers},
    }
    if schema is not None:
        response["content"] = _json(schema)
    return response


def _register_components(spec: APISpec, config: Mapping[str, Any]) -> None:
    """Schemas, headers, parameters and shared responses, referred to by name from the paths."""
    max_bytes = config["MAX_EVENT_BYTES"]
    event = {
        "description": "One analytics event; `null` for an optional field means absent. An unknown field, or more "
        f"than {max_bytes} bytes as compact JSON, makes the event invalid: it is listed in `rejected`. "
        "`payload` keys named in REDACT_KEYS are redacted at any depth before the event is written."
    }
    batch = {"description": "The request body. Top-level keys other than these are ignored."}
    spec.components.schema("Event", event, schema=EventSchema(max_bytes=max_bytes))
    spec.components.schema("Batch", batch, schema=BatchSchema)
    for schema in _RESPONSE_SCHEMAS:
        spec.components.schema(schema.__name__.removesuffix("Schema"), {"description": schema.__doc__}, schema=schema)

    spec.components.header(
        "RequestId",
        {
            "description": "The request's id: the trusted proxy's X-Request-ID where it sent a sane one, "
            "else a new one. It is also on every event line of the request.",
            "required": True,
            "schema": {"type": "string", "pattern": f"^{REQUEST_ID_PATTERN.pattern}$"},
        },
    )
    spec.components.header(
        "Allow", {"description": "The methods the path does answer.", "required": True, "schema": {"type": "string"}}
    )
    spec.components.parameter(
        "RequestId",
        "header",
        {
            "name": "X-Request-ID",
            "description": "Believed only from TRUSTED_PROXIES and only if it matches "
            f"`{REQUEST_ID_PATTERN.pattern}`; otherwise the service makes its own.",
            "required": False,
            "schema": {"type": "string"},
        },
    )
    spec.components.response(
        "MethodNotAllowed", _response("Any method the path does not answer.", "MethodNotAllowed", Allow="Allow")
    )
    spec.components.response("NotFound", _response("Any path not in this document.", "NotFound"))


def _ingest_operations(config: Mapping[str, Any]) -> dict[str, Any]:
    """POST /api/analytics and its CORS preflight."""
    limit = config["MAX_BODY_BYTES"]
    body_description = (
        "The batch, parsed as JSON whatever the Content-Type says (also none at all). "
        f"At most {limit} bytes on the wire and again after decompression (else 413). "
        f"Each event at most {config['MAX_EVENT_BYTES']} bytes as compact JSON (else that event is rejected). "
        "Send `Content-Encoding: gzip` for a gzip-compressed body; any other encoding but identity is a 415. "
        "Not JSON, and so a 400 `Invalid JSON`: invalid UTF-8, lone surrogates (even escaped), NaN, Infinity, "
        "numbers such as 1e400 that overflow a double, nesting deeper than 1024. Integers beyond 64 bits are read "
        "as doubles; of duplicate keys the last wins."
    )
    return {
        "post": {
            "summary": "Ingest a batch of analytics events",
            "description": "Every accepted event is written as one JSON line on the service's stdout "
            "before the 200 is sent. A batch is checked whole before anything is written.",
            "operationId": "ingest",
            "parameters": [
                {
                    "name": "Content-Encoding",
                    "in": "header",
                    "required": False,
                    "description": "`gzip` (or `x-gzip`) for a gzip body; `identity` or none for a plain one.",
                    "schema": {"type": "string", "enum": ["gzip", "x-gzip", "identity"]},
                }
            ],
            "requestBody": {
                "required": True,
                "description": body_description,
                "content": {media_type: {"schema": "Batch"} for media_type in REQUEST_MEDIA_TYPES},
            },
            "responses": {
                "200": _response("Accepted: every valid event is written (`rejected` lists the others).", "Success"),
                "400": _response(
                    "`Invalid JSON`, `Invalid events` or `Invalid timestamp`: retrying the same body cannot succeed.",
                    _one_of("InvalidJson", "InvalidEvents", "InvalidTimestamp"),
                ),
                "408": _response(
                    f"The body stopped arriving for {config['BODY_READ_TIMEOUT']} s; nothing was written.",
                    "RequestTimeout",
                ),
                "413": _response(
                    f"Payload too large (over {limit} bytes) or too many events (over {config['MAX_EVENTS']}).",
                    _one_of("PayloadTooLarge", "TooManyEvents"),
                ),
                "415": _response("A Content-Encoding other than gzip or identity.", "UnsupportedEncoding"),
                "500": _response(
                    "A fault of ours (the event log failed): nothing was written (or, for a batch larger than the "
                    "stdout pipe, some whole lines, which a retry repeats: deduplicate on id); retry.",
                    "ServerError",
                ),
            },
        },
        "options": {
            "summary": "CORS preflight",
            "description": "Answered for any origin in CORS_ORIGINS; without credentials.",
            "operationId": "ingestPreflight",
            "parameters": [
                {"name": "Origin", "in": "header", "required": False, "schema": {"type": "string"}},
                *(
                    {"name": name, "in": "header", "required": False, "schema": {"type": "string"}}
                    for name in ("Access-Control-Request-Method", "Access-Control-Request-Headers")
                ),
            ],
            "responses": {
                "204": {
                    "description": "No body. The CORS headers are present when the Origin is allowed.",
                    "headers": {
                        "X-Request-ID": "RequestId",
                        "Allow": "Allow",
                        "Access-Control-Allow-Origin": {"schema": {"type": "string"}},
                        "Access-Control-Allow-Methods": {"schema": {"type": "string"}},
                        "Access-Control-Max-Age": {"schema": {"type": "string"}},
                    },
                },
            },
        },
    }


def build_spec(config: Mapping[str, Any]) -> dict[str, Any]:
    """The OpenAPI document for an app with these settings (the limits appear in it)."""
    plugin = MarshmallowPlugin()
    spec = APISpec(
        title="Analytics ingestion",
        version="1.0.0",
        openapi_version=OPENAPI_VERSION,
        plugins=[plugin],
        info={
            "description": "First-party analytics: POST batches of events; each accepted event becomes one JSON line "
            "on stdout. Every response is JSON (but the 204 of a preflight) and carries X-Request-ID; any path "
            "not listed here is a 404 (`#/components/responses/NotFound`), and any method not listed for a path "
            "a 405 with an Allow header (`#/components/responses/MethodNotAllowed`)."
        },
    )
    assert plugin.converter is not None
    plugin.converter.add_attribute_function(_custom_fields(config["MAX_EVENTS"]))
    _register_components(spec, config)
    request_id = ["RequestId"]
    spec.path(path="/api/analytics", parameters=request_id, operations=_ingest_operations(config))
    spec.path(
        path="/healthz",
        parameters=request_id,
        operations={
            "get": {
                "summary": "Liveness",
                "operationId": "health",
                "responses": {"200": _response("The service is up.", "Health")},
            }
        },
    )
    spec.path(
        path="/api/openapi.json",
        parameters=request_id,
        operations={
            "get": {
                "summary": "This document",
                "operationId": "openapi",
                "responses": {
                    "200": _response("The OpenAPI document.", {"type": "object", "required": ["openapi", "paths"]}),
                },
            }
        },
    )
    return spec.to_dict()


@bp.record_once
def _build_once(state: BlueprintSetupState) -> None:
    """Render the document when the blueprint is registered: the settings are loaded by then."""
    state.app.extensions["openapi"] = orjson.dumps(build_spec(state.app.config))


@bp.get("/api/openapi.json")
def openapi_document() -> Response:
    """The OpenAPI document, rendered once."""
    return Response(current_app.extensions["openapi"], mimetype="application/json")
