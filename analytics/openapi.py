"""The OpenAPI 3.1 document of the service, built once per app.

``GET /api/openapi.json`` serves it. The request side comes from
``analytics.schemas`` through apispec's marshmallow plugin, so the document
cannot drift from what is checked. The response bodies, which the views build
as plain dicts, are JSON Schemas written here: the error bodies from one
table, with the message strings the raising code uses (analytics.messages).
tests/test_openapi.py checks real responses against them, and
tests/test_fuzz.py runs every schemathesis check against real gunicorn.

The document says what a request must be for its answer to be a 200, and no
more: schemathesis's positive_data_acceptance sends what the document calls
valid and expects it accepted, negative_data_rejection the opposite.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, Response, current_app
from flask.blueprints import BlueprintSetupState
from marshmallow import fields

from analytics import messages
from analytics.body import GZIP
from analytics.peers import REQUEST_ID_PATTERN
from analytics.schemas import MAX_ID_LENGTH, BatchSchema, EventSchema, JsonArray, Timestamp
from analytics.timestamps import MILLISECONDS_FROM

OPENAPI_VERSION = "3.1.0"
# navigator.sendBeacon sends the JSON text as text/plain (a CORS-safelisted type, so no preflight): it is
# documented as what it is, a string holding the JSON text of a Batch.
JSON_TEXT_MEDIA_TYPE = "text/plain"
ENCODINGS = [*GZIP, "identity"]

bp = Blueprint("openapi", __name__)


def _ref(name: str) -> dict[str, str]:
    """A reference to a component schema."""
    return {"$ref": f"#/components/schemas/{name}"}


# --- timestamps: what analytics.timestamps.parse_timestamp takes ----------------------------------

# Unix seconds of the first and just past the last instant datetime holds (years 1 to 9999, in UTC).
FIRST_SECOND = int(datetime.min.replace(tzinfo=UTC).timestamp())
END_SECOND = int(datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()) + 1
# Years 2 to 9998: in years 1 and 9999 an offset can carry the instant, in UTC, out of datetime's range. (Saying
# exactly which times of the first and last day overflow takes a comparison a pattern cannot make; a `not`
# around an approximation would be sent by schemathesis as invalid, and the service accepts most of it.)
_YEARS_2_TO_9998 = r"^(?:000[2-9]|00[1-9]\d|0[1-9]\d\d|[1-8]\d{3}|9[0-8]\d\d|99[0-8]\d|999[0-8])-"
# RFC 3339 date-times that Python's datetime.fromisoformat refuses.
_REFUSED_DATE_TIMES = [
    {"pattern": r"[Tt ]\d\d:\d\d:60", "description": "A leap second."},
    {"pattern": "z$", "description": "A lower-case `z` (write `Z`)."},
]
TIMESTAMP_FORMS = [
    {
        "type": "string",
        "format": "date-time",
        "pattern": _YEARS_2_TO_9998,
        "not": {"anyOf": _REFUSED_DATE_TIMES},
        "description": "ISO 8601 as Python's datetime.fromisoformat reads it. The schema states the RFC 3339 "
        "date-times of years 2 to 9998 it takes; the service also takes them without a zone (as UTC), a date "
        "alone, week dates, the basic format, and years 1 and 9999 where the instant, in UTC, stays within "
        "years 1 to 9999.",
        "examples": ["2024-05-20T14:32:00Z", "2024-05-20T16:32:00+02:00"],
    },
    {
        "type": "number",
        "minimum": FIRST_SECOND,
        "exclusiveMaximum": END_SECOND * 1000,
        "description": f"Unix time: seconds, or milliseconds from {MILLISECONDS_FROM} on (the year 5138 in "
        "seconds, 1973 in milliseconds); years 1 to 9999.",
        "examples": [1716215520, 1716215520000],
    },
    {
        "type": "number",
        "minimum": FIRST_SECOND * 1000,
        "maximum": -MILLISECONDS_FROM,
        "description": f"Unix time in milliseconds before the year 1967 (-{MILLISECONDS_FROM} and less).",
    },
]


def _too_large(max_bytes: int) -> str:
    """What MAX_EVENT_BYTES bounds, said once for the descriptions."""
    return f"more than {max_bytes} bytes as its log line holds it (compact JSON, line breaks escaped)"


def _custom_fields(max_events: int, max_event_bytes: int) -> Any:
    """An apispec attribute function for the two custom fields of analytics.schemas."""

    def custom_field2properties(self: Any, field: fields.Field, **kwargs: Any) -> dict:
        if isinstance(field, Timestamp):
            forms = [*TIMESTAMP_FORMS, {"type": "null"}] if field.allow_none else list(TIMESTAMP_FORMS)
            return {"anyOf": forms}
        if isinstance(field, JsonArray):
            # Each element is checked on its own, so elements need not be events for the batch to be a 200:
            # it is one as long as some element is a valid event (or there are none at all).
            return {
                "type": "array",
                "maxItems": max_events,
                "anyOf": [{"maxItems": 0}, {"contains": _ref("Event")}],
                "description": f"The events: at most {max_events} (more is a 413). Each element is checked on its "
                "own: one that is not a valid `Event` (not an object, an unknown field, a wrong type, "
                f"{_too_large(max_event_bytes)}) is listed in `rejected` while the valid ones are accepted. "
                "The answer is a 200 when the array is empty or holds at least one valid event, and a "
                "400 `Invalid events` when every element is invalid.",
            }
        return {}

    return custom_field2properties


# --- response bodies ---------------------------------------------------------------------------

NON_NEGATIVE = {"type": "integer", "minimum": 0}
REJECTION = {
    "type": "object",
    "description": "One element of `events` that was not accepted, and why.",
    "properties": {
        "index": {**NON_NEGATIVE, "description": "Its index in `events`."},
        "id": {
            "type": "string",
            "maxLength": MAX_ID_LENGTH,
            "description": f"The element's own `id`, where it had a string of up to {MAX_ID_LENGTH}.",
        },
        "errors": {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "description": "marshmallow's messages: a list of strings per field name, `_schema` for the element "
            "as a whole (too large, too deeply nested, not an object). For an event the tracking plan rejects "
            "(TRACKING_PLAN_MODE reject), the keys are JSON pointers into the event (`/payload/amount`, `/type`) "
            "and the messages its violations'.",
        },
    },
    "required": ["index", "errors"],
    "additionalProperties": False,
}
REJECTED = {"type": "array", "items": _ref("Rejection"), "minItems": 1}
VIOLATION = {
    "type": "object",
    "description": "One way an event breaks the tracking plan: where, and which rule. Never the value.",
    "properties": {
        "path": {"type": "string", "description": "A JSON pointer into the event: `/type`, or under `/payload`."},
        "message": {"type": "string", "minLength": 1},
    },
    "required": ["path", "message"],
    "additionalProperties": False,
}
FLAGGING = {
    "type": "object",
    "description": "An accepted event that breaks the tracking plan (TRACKING_PLAN_MODE flag): written, with its "
    "`plan_violations` on its line too.",
    "properties": {
        "index": {**NON_NEGATIVE, "description": "Its index in `events`."},
        "id": {"type": "string", "maxLength": MAX_ID_LENGTH, "description": "The event's own `id`, as in `rejected`."},
        "plan_violations": {"type": "array", "items": _ref("Violation"), "minItems": 1},
    },
    "required": ["index", "plan_violations"],
    "additionalProperties": False,
}
TRACKING_PLAN = {
    "type": "object",
    "description": "The tracking plan in force: how it is enforced, and the JSON Schema (draft 2020-12) of each "
    "event type's `payload`. Without TRACKING_PLAN: mode `off`, no types.",
    "properties": {
        "mode": {"enum": ["off", "flag", "reject"], "description": "What a payload that breaks its schema gets."},
        "unplanned": {"enum": ["allow", "flag", "reject"], "description": "What a type not in `types` gets."},
        "types": {"type": "object", "additionalProperties": {"type": ["object", "boolean"]}},
    },
    "required": ["mode", "unplanned", "types"],
    "additionalProperties": False,
}
SUCCESS = {
    "type": "object",
    "description": "The valid events are written; the invalid ones, if any, are listed.",
    "properties": {
        "success": {"const": True},
        "received": {**NON_NEGATIVE, "description": "How many events were accepted (and written)."},
        "rejected": {
            **REJECTED,
            "description": "Present only when some elements were invalid: `received` + its length = the number "
            "of elements.",
        },
        "flagged": {
            "type": "array",
            "items": _ref("Flagging"),
            "minItems": 1,
            "description": "Present only when the tracking plan flags some accepted events.",
        },
    },
    "required": ["success", "received"],
    "additionalProperties": False,
}


def _status_body(**properties: Any) -> dict[str, Any]:
    """A small JSON object with exactly these properties, all required, each a constant."""
    return {
        "type": "object",
        "properties": {name: {"const": value} for name, value in properties.items()},
        "required": list(properties),
        "additionalProperties": False,
    }


@dataclass(frozen=True)
class ErrorBody:
    """One error body of the contract, ``{"error": message, **extra}``, as a component schema."""

    name: str
    status: int
    messages: tuple[str, ...]
    description: str
    # Properties besides `error`: required ones, and ones present only sometimes.
    extra: Mapping[str, dict] = field(default_factory=dict)
    optional: Mapping[str, dict] = field(default_factory=dict)

    def schema(self) -> dict[str, Any]:
        """The JSON Schema of the body."""
        error = {"const": self.messages[0]} if len(self.messages) == 1 else {"enum": list(self.messages)}
        return {
            "type": "object",
            "description": f"{self.status}: {self.description}",
            "properties": {"error": error, **self.extra, **self.optional},
            "required": ["error", *self.extra],
            "additionalProperties": False,
        }


ERROR_BODIES = (
    ErrorBody(
        "InvalidJson",
        400,
        (messages.INVALID_JSON,),
        "The body is not JSON: malformed, not UTF-8, NaN or Infinity, a corrupt or truncated gzip stream, or "
        "shorter than its Content-Length.",
    ),
    ErrorBody(
        "InvalidEvents",
        400,
        (messages.INVALID_EVENTS,),
        "The body is not an object with an `events` array, or every element of `events` is invalid.",
        optional={"rejected": {**REJECTED, "description": "Present when `events` had elements, all invalid."}},
    ),
    ErrorBody(
        "InvalidTimestamp",
        400,
        (messages.INVALID_TIMESTAMP,),
        "The batch `timestamp` is present but neither ISO 8601 nor Unix time within years 1 to 9999.",
    ),
    ErrorBody(
        "OriginNotAllowed",
        403,
        (messages.ORIGIN_NOT_ALLOWED,),
        "CORS_ORIGINS is a list and the request's Origin header is not in it: nothing is read or written.",
    ),
    ErrorBody("NotFound", 404, (messages.NOT_FOUND,), "No such path."),
    ErrorBody(
        "MethodNotAllowed",
        405,
        (messages.METHOD_NOT_ALLOWED,),
        "The path exists, the method does not; the Allow header lists those that do.",
    ),
    ErrorBody(
        "RequestTimeout",
        408,
        (messages.REQUEST_TIMEOUT,),
        "The body stopped arriving for BODY_READ_TIMEOUT seconds: nothing was written.",
    ),
    ErrorBody(
        "PayloadTooLarge",
        413,
        (messages.PAYLOAD_TOO_LARGE,),
        "The body is over MAX_BODY_BYTES (`limit_bytes`), on the wire or after decompression.",
        extra={"limit_bytes": NON_NEGATIVE},
    ),
    ErrorBody(
        "TooManyEvents",
        413,
        (messages.TOO_MANY_EVENTS,),
        "`events` has more than MAX_EVENTS (`limit_events`) elements.",
        extra={"limit_events": NON_NEGATIVE},
    ),
    ErrorBody(
        "TooManyContainers",
        413,
        (messages.TOO_MANY_CONTAINERS,),
        "The body would take too much memory to parse: objects and arrays at 64 bytes each and keys at 120 more "
        "make over 24 MiB (counted from its brackets and colons, strings' included).",
    ),
    ErrorBody(
        "UnsupportedEncoding",
        415,
        (messages.UNSUPPORTED_ENCODING,),
        "A Content-Encoding other than those listed in `supported`.",
        extra={"supported": {"const": ENCODINGS}},
    ),
    ErrorBody(
        "TooManyRequests",
        429,
        (messages.TOO_MANY_REQUESTS,),
        "RATE_LIMIT is set and this client address has used it up: nothing was read or written. Retry after "
        "Retry-After seconds, when its window ends.",
    ),
    ErrorBody(
        "ServerError",
        500,
        (messages.LOG_WRITE_FAILED, messages.INTERNAL_ERROR),
        f"A fault of ours, never of the request: retry. `{messages.LOG_WRITE_FAILED}`: the event log could not "
        "take the batch, and nothing of it was written (or, for a batch larger than the stdout pipe, some whole "
        f"lines, which a retry repeats: deduplicate on `id`). `{messages.INTERNAL_ERROR}`: a bug.",
    ),
    ErrorBody(
        "EventStoreUnavailable",
        503,
        (messages.EVENT_STORE_UNAVAILABLE,),
        "SINKS includes nats and JetStream has not acknowledged every event of the batch (not connected, or the "
        "acknowledgements did not all arrive within NATS_ACK_TIMEOUT): retry the whole batch after Retry-After "
        "seconds. Some of its events may be stored already; those with an `id` are not stored twice.",
    ),
    ErrorBody(
        "NotReady",
        503,
        (messages.NOT_READY,),
        "The event log cannot take a batch now; `reason` says why.",
        extra={"reason": {"type": "string", "minLength": 1}},
    ),
)
_ERRORS = {body.name: body for body in ERROR_BODIES}


# --- the document ------------------------------------------------------------------------------


def _response(description: str, content: dict | None = None, headers: Mapping[str, Any] | None = None) -> dict:
    """A response object: every response carries X-Request-ID, some more headers."""
    response: dict[str, Any] = {"description": description, "headers": {"X-Request-ID": "RequestId", **(headers or {})}}
    if content is not None:
        response["content"] = content
    return response


def _json(schema: dict | str) -> dict:
    """JSON content whose schema is inline or a component name."""
    return {"application/json": {"schema": schema}}


def _errors(*names: str, headers: Mapping[int, Mapping[str, Any]] | None = None) -> dict[str, dict]:
    """The responses for these error bodies, one per status (a oneOf where a status has several), with the
    ``headers`` given for a status."""
    by_status: dict[int, list[ErrorBody]] = {}
    for name in names:
        by_status.setdefault(_ERRORS[name].status, []).append(_ERRORS[name])
    responses = {}
    for status, bodies in by_status.items():
        schema = _ref(bodies[0].name) if len(bodies) == 1 else {"oneOf": [_ref(body.name) for body in bodies]}
        description = " ".join(f"`{' / '.join(body.messages)}`: {body.description}" for body in bodies)
        responses[str(status)] = _response(description, _json(schema), (headers or {}).get(status))
    return responses


def _header(description: str, schema: dict | None = None, required: bool = False) -> dict:
    """A header object (of a response) or the body of a header parameter."""
    return {"description": description, "required": required, "schema": schema or {"type": "string"}}


def _register_components(spec: APISpec, config: Mapping[str, Any]) -> None:
    """Schemas, headers, parameters and shared responses, referred to by name from the paths."""
    max_bytes = config["MAX_EVENT_BYTES"]
    event = {
        "description": "One analytics event; `null` for an optional field means absent. Also invalid, though no "
        f"schema can say it: {_too_large(max_bytes)}, nesting deeper than 254. `payload` keys named in REDACT_KEYS "
        "are redacted at any depth before the event is written."
    }
    batch = {"description": "The request body. Top-level keys other than these are ignored."}
    spec.components.schema("Event", event, schema=EventSchema(max_bytes=max_bytes))
    spec.components.schema("Batch", batch, schema=BatchSchema)
    spec.components.schema("Rejection", REJECTION)
    spec.components.schema("Success", SUCCESS)
    spec.components.schema("Violation", VIOLATION)
    spec.components.schema("Flagging", FLAGGING)
    spec.components.schema("TrackingPlan", TRACKING_PLAN)
    for body in ERROR_BODIES:
        spec.components.schema(body.name, body.schema())
    spec.components.schema("Health", _status_body(status="ok"))
    spec.components.schema("Ready", _status_body(status="ready"))

    spec.components.header(
        "RequestId",
        _header(
            "The request's id: the trusted proxy's X-Request-ID where it sent a sane one, else a new one. It is "
            "also on every event line of the request.",
            {"type": "string", "pattern": f"^{REQUEST_ID_PATTERN.pattern}$"},
            required=True,
        ),
    )
    spec.components.header("Allow", _header("The methods the path does answer.", required=True))
    spec.components.header(
        "RetryAfter",
        _header("Seconds to wait before retrying the same batch.", {"type": "string", "pattern": "^[0-9]+$"}, True),
    )
    spec.components.parameter(
        "RequestId",
        "header",
        {
            "name": "X-Request-ID",
            **_header(
                f"Believed only from TRUSTED_PROXIES and only if it matches `{REQUEST_ID_PATTERN.pattern}`; "
                "otherwise the service makes its own."
            ),
        },
    )
    spec.components.parameter(
        "Origin",
        "header",
        {
            "name": "Origin",
            **_header(
                "Sent by browsers. With CORS_ORIGINS a list, an Origin not in it is a 403 on every path under "
                "/api/; with `*` (the default), or without the header, any request goes through."
            ),
        },
    )
    spec.components.response("NotFound", _response("Any path not in this document.", _json(_ref("NotFound"))))
    spec.components.response(
        "MethodNotAllowed",
        _response(
            "Any method a path does not answer (every path also answers HEAD where it answers GET, and OPTIONS).",
            _json(_ref("MethodNotAllowed")),
            {"Allow": "Allow"},
        ),
    )


def _ingest_operations(config: Mapping[str, Any]) -> dict[str, Any]:
    """POST /api/analytics and its CORS preflight."""
    limit = config["MAX_BODY_BYTES"]
    body_description = (
        "The batch, read as JSON text whatever the Content-Type says: `text/plain` is what navigator.sendBeacon "
        "sends, and any other type, or none, is read the same way (`curl -d` sends "
        "`application/x-www-form-urlencoded`; its body is the JSON text all the same, not a form). "
        f"At most {limit} bytes on the wire and again after decompression (else 413). "
        "With `Content-Encoding: gzip` (or `x-gzip`) the body is that JSON text gzip-compressed; any encoding "
        "but those and `identity` is a 415. An event is rejected (alone) when "
        f"{_too_large(config['MAX_EVENT_BYTES'])}. Not JSON, and so a 400 `Invalid JSON`: invalid UTF-8, lone "
        "surrogates (even escaped), NaN, Infinity, numbers such as 1e400 that overflow a double, nesting deeper "
        "than 1024. Integers beyond 64 bits are read as doubles; of duplicate keys the last wins."
    )
    json_text = {"type": "string", "contentMediaType": "application/json", "contentSchema": _ref("Batch")}
    return {
        "post": {
            "summary": "Ingest a batch of analytics events",
            "description": "Every accepted event is written as one JSON line to each sink in SINKS (stdout by "
            "default; a JetStream stream with nats) before the 200 is sent. A batch is checked whole before "
            "anything is written. A line holds the event and the request's context: batch_timestamp, received_at, "
            "request_id, client_ip (anonymized unless CLIENT_IP says full or none), and as the settings say "
            "derived_timestamp (the event's time corrected for the client's clock), visitor_id, ua, and bot "
            "(true on a bot's lines only, by default). Batches from bots under BOTS=drop and from EXCLUDE_IPS are "
            "answered as any other and not written.",
            "operationId": "ingest",
            # Content-Encoding is described with the body, not as a parameter: a parameter would say any of its
            # values goes with any body, and a gzip body is another body.
            "parameters": ["Origin"],
            "requestBody": {
                "required": True,
                "description": body_description,
                "content": {
                    "application/json": {"schema": _ref("Batch")},
                    JSON_TEXT_MEDIA_TYPE: {"schema": json_text},
                },
            },
            "responses": {
                "200": _response(
                    "Accepted: every valid event is written (`rejected` lists the others).", _json(_ref("Success"))
                ),
                **_errors(
                    "InvalidJson",
                    "InvalidEvents",
                    "InvalidTimestamp",
                    "OriginNotAllowed",
                    "RequestTimeout",
                    "PayloadTooLarge",
                    "TooManyEvents",
                    "TooManyContainers",
                    "UnsupportedEncoding",
                    # Only with a limit: without one the service never answers 429.
                    *(["TooManyRequests"] if config["RATE_LIMIT"] else []),
                    "ServerError",
                    "EventStoreUnavailable",
                    headers={429: {"Retry-After": "RetryAfter"}, 503: {"Retry-After": "RetryAfter"}},
                ),
            },
        },
        "options": {
            "summary": "CORS preflight",
            "description": "Answered for any origin CORS_ORIGINS allows; credentials are never allowed.",
            "operationId": "ingestPreflight",
            "parameters": [
                "Origin",
                *(
                    {"name": name, "in": "header", **_header("What the browser is about to send.")}
                    for name in ("Access-Control-Request-Method", "Access-Control-Request-Headers")
                ),
            ],
            "responses": {
                "204": _response(
                    "No body. The CORS headers are present when the Origin is allowed.",
                    headers={
                        "Allow": "Allow",
                        **{
                            name: _header("CORS: what the browser may send, and for how long it may remember that.")
                            for name in (
                                "Access-Control-Allow-Origin",
                                "Access-Control-Allow-Methods",
                                "Access-Control-Allow-Headers",
                                "Access-Control-Max-Age",
                            )
                        },
                    },
                ),
                **_errors("OriginNotAllowed"),
            },
        },
    }


def _get(operation_id: str, summary: str, responses: dict, **more: Any) -> dict[str, Any]:
    """A GET operation."""
    return {"get": {"summary": summary, "operationId": operation_id, **more, "responses": responses}}


def _client_operations() -> dict[str, dict]:
    """GET /analytics.js and GET /demo, the browser client (analytics/client.py): not JSON."""
    caching = _header("A day for /analytics.js, a year and `immutable` for the current `?v=`.", required=True)
    cached = {
        "ETag": _header("The script's version (its own for the gzipped body).", required=True),
        "Cache-Control": caching,
    }
    script = {"text/javascript": {"schema": {"type": "string"}}}
    page = {"text/html": {"schema": {"type": "string"}}}
    return {
        "/analytics.js": _get(
            "script",
            "The browser client",
            {
                "200": _response("The script; gzipped for clients that accept it.", script, cached),
                "302": _response(
                    "A `v` that is not the current version: to the current one, with the stable URL's caching "
                    "(the body is a short page linking there).",
                    page,
                    {
                        "Location": _header(
                            "The current version's URL.",
                            {"type": "string", "pattern": r"^/analytics\.js\?v=[0-9a-f]+$"},
                            required=True,
                        ),
                        "Cache-Control": caching,
                    },
                ),
                "304": _response("If-None-Match names the current ETag: no body.", headers=cached),
            },
            description="Loaded by sites from any origin. Its caching is in docs/browser-client.md.",
            parameters=[
                {
                    "name": "v",
                    "in": "query",
                    **_header("A pinned version (the demo page shows the current one and its integrity hash)."),
                },
                {"name": "If-None-Match", "in": "header", **_header("A cached copy's ETag.")},
            ],
        ),
        "/demo": _get(
            "demo",
            "A page to try the client",
            {"200": _response("An HTML page.", page)},
        ),
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
            "on stdout. Every response carries X-Request-ID. Every response is JSON but the preflight's 204 and "
            "those of the browser client's /analytics.js and /demo. Any path not listed here is a 404 "
            "(`#/components/responses/NotFound`), and any method not listed for a path a 405 with an Allow header "
            "(`#/components/responses/MethodNotAllowed`), but HEAD where GET is listed and OPTIONS, which every "
            "path answers with a 204 and Allow. Under /api/, a browser's request from an origin CORS_ORIGINS "
            "does not allow is a 403 on every path."
        },
    )
    assert plugin.converter is not None
    plugin.converter.add_attribute_function(_custom_fields(config["MAX_EVENTS"], config["MAX_EVENT_BYTES"]))
    _register_components(spec, config)
    request_id = ["RequestId"]
    spec.path(path="/api/analytics", parameters=request_id, operations=_ingest_operations(config))
    spec.path(
        path="/api/openapi.json",
        parameters=request_id,
        operations=_get(
            "openapi",
            "This document",
            {
                "200": _response("The OpenAPI document.", _json({"type": "object", "required": ["openapi", "paths"]})),
                **_errors("OriginNotAllowed"),
            },
            parameters=["Origin"],
        ),
    )
    spec.path(
        path="/api/tracking-plan",
        parameters=request_id,
        operations=_get(
            "trackingPlan",
            "The tracking plan in force",
            {
                "200": _response("The plan: its modes and each type's payload schema.", _json(_ref("TrackingPlan"))),
                **_errors("OriginNotAllowed"),
            },
            description="What TRACKING_PLAN holds, for clients and tools to check events against "
            "(docs/tracking-plan.md).",
            parameters=["Origin"],
        ),
    )
    spec.path(
        path="/healthz",
        parameters=request_id,
        operations=_get("health", "Liveness", {"200": _response("The process is up.", _json(_ref("Health")))}),
    )
    spec.path(
        path="/readyz",
        parameters=request_id,
        operations=_get(
            "ready",
            "Readiness",
            {
                "200": _response("The event log can take writes.", _json(_ref("Ready"))),
                **_errors("NotReady"),
            },
        ),
    )
    for path, operations in _client_operations().items():
        spec.path(path=path, parameters=request_id, operations=operations)
    return spec.to_dict()


@bp.record_once
def _build_once(state: BlueprintSetupState) -> None:
    """Render the document when the blueprint is registered: the settings are loaded by then."""
    state.app.extensions["openapi"] = orjson.dumps(build_spec(state.app.config))


@bp.get("/api/openapi.json")
def openapi_document() -> Response:
    """The OpenAPI document, rendered once."""
    return Response(current_app.extensions["openapi"], mimetype="application/json")
