"""The marshmallow schemas: the one definition of a valid batch and a valid event."""

from typing import Any

import orjson
from marshmallow import EXCLUDE, RAISE, Schema, ValidationError, fields, validate, validates_schema

from analytics.lines import encode
from analytics.timestamps import parse_timestamp


class Timestamp(fields.Field):
    """ISO 8601 string or Unix time number, loaded as a naive datetime in UTC (analytics.timestamps)."""

    default_error_messages = {
        "invalid": "Not a valid timestamp: use an ISO 8601 string or Unix time in seconds or milliseconds."
    }

    # What it loads a value as, or ValueError; the fast loaders call it directly.
    parse = staticmethod(parse_timestamp)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        try:
            return self.parse(value)
        except ValueError as error:
            raise self.make_error("invalid") from error


class JsonArray(fields.Field):
    """A JSON array taken as it is: each element is checked on its own by EventSchema."""

    default_error_messages = {"invalid": "Not a valid array."}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> list:
        if not isinstance(value, list):
            raise self.make_error("invalid")
        return value


def size_error(event: Any, max_bytes: int) -> str | None:
    """Why ``event`` cannot be logged as one line, or None.

    MAX_EVENT_BYTES measures the event as its line holds it (``analytics.lines``:
    compact JSON, line breaks escaped), so the limit bounds what is written, not
    only what was sent. The line adds its context to that (see docs/event-log.md).
    """
    try:
        size = len(encode(event))
    except orjson.JSONEncodeError:
        # orjson writes at most 254 levels of nesting; parsing allows 1024.
        return "Event is nested too deeply to log."
    if size > max_bytes:
        return f"Event is larger than {max_bytes} bytes as JSON."
    return None


# Longest client-made event id; ids are echoed in `rejected` only up to this length too.
MAX_ID_LENGTH = 128


class EventSchema(Schema):
    """One analytics event. ``None`` for an optional field means absent."""

    class Meta:
        # An unknown field invalidates the event, naming the field: nothing a
        # client sends is dropped without telling it.
        unknown = RAISE

    type = fields.String(required=True, validate=validate.Length(min=1, max=256))
    payload = fields.Dict(allow_none=True)
    userId = fields.String(allow_none=True)
    sessionId = fields.String(allow_none=True)
    id = fields.String(allow_none=True, validate=validate.Length(max=MAX_ID_LENGTH))
    timestamp = Timestamp(allow_none=True)

    def __init__(self, *, max_bytes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_bytes = max_bytes

    def fits(self, event: Any) -> bool:
        """Whether the event can be written as one line within MAX_EVENT_BYTES."""
        return size_error(event, self.max_bytes) is None

    def all_fit(self, events: list) -> bool:
        """Whether every one of ``events`` fits: at once where their list's JSON does (each is part of it),
        else one by one."""
        return size_error(events, self.max_bytes) is None or all(map(self.fits, events))

    @validates_schema(pass_original=True)
    def within_size(self, data: dict, original_data: Any, **kwargs: Any) -> None:
        error = size_error(original_data, self.max_bytes)
        if error:
            raise ValidationError(error)


class BatchSchema(Schema):
    """The request body: the events and when the client sent them."""

    class Meta:
        # Top-level keys other than these carry nothing we log; see the README.
        unknown = EXCLUDE

    events = JsonArray(required=True)
    timestamp = Timestamp(allow_none=True)
