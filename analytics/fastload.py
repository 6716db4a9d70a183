"""A fast event loader derived from EventSchema, for the events that are plainly valid.

marshmallow costs about 12 µs an event, too much for batches of hundreds. The
loader built here reads the schema's own fields and validators and accepts an
event only where it can prove the schema would, returning what ``schema.load``
would return. Anything else (wrong type, bad length, unknown key, too large)
goes back to marshmallow, which decides and explains. The hypothesis test in
tests/test_fastload.py checks that the two agree on arbitrary events.
"""

from collections.abc import Callable
from typing import Any

from marshmallow import ValidationError, fields, validate

from analytics.schemas import EventSchema, Timestamp, size_error

# Returned by a field check that cannot vouch for a value.
DEFER = object()

FieldCheck = Callable[[Any], Any]


def _string_check(field: fields.String) -> FieldCheck:
    """Accept a str whose length is within the field's Length validators."""
    low, high = 0, None
    for validator in field.validators:
        if not isinstance(validator, validate.Length) or validator.equal is not None:
            raise TypeError(f"fastload cannot derive a check for validator {validator!r}")
        low = max(low, validator.min or 0)
        if validator.max is not None:
            high = validator.max if high is None else min(high, validator.max)

    def check(value: Any) -> Any:
        if type(value) is str and low <= len(value) and (high is None or len(value) <= high):
            return value
        return DEFER

    return check


def _dict_check(field: fields.Dict) -> FieldCheck:
    """Accept a dict, which the schema loads unchanged when no key or value field is set."""
    if field.key_field is not None or field.value_field is not None or field.validators:
        raise TypeError(f"fastload cannot derive a check for {field!r}")

    def check(value: Any) -> Any:
        return value if type(value) is dict else DEFER

    return check


def _timestamp_check(field: Timestamp) -> FieldCheck:
    """Accept what the field itself deserializes, with the field's own code."""
    if field.validators:
        raise TypeError(f"fastload cannot derive a check for {field!r}")

    def check(value: Any) -> Any:
        try:
            return field.deserialize(value)
        except ValidationError:
            return DEFER

    return check


_CHECK_BUILDERS: dict[type, Callable[[Any], FieldCheck]] = {
    fields.String: _string_check,
    fields.Dict: _dict_check,
    Timestamp: _timestamp_check,
}


def _field_check(field: fields.Field) -> FieldCheck:
    """Build the check for one field, refusing any kind of field not understood here."""
    builder = _CHECK_BUILDERS.get(type(field))
    if builder is None:
        raise TypeError(f"fastload cannot derive a check for {type(field).__name__}")
    check = builder(field)
    if not field.allow_none:
        return check
    return lambda value: None if value is None else check(value)


def compile_loader(schema: EventSchema) -> Callable[[Any], dict | None]:
    """Return ``load(raw)``: what ``schema.load(raw)`` returns, or None to let marshmallow decide."""
    checks = {(field.data_key or name): (name, _field_check(field)) for name, field in schema.load_fields.items()}
    required = frozenset(key for key, (name, _) in checks.items() if schema.load_fields[name].required)
    known = frozenset(checks)
    max_bytes = schema.max_bytes

    def load(raw: Any) -> dict | None:
        if type(raw) is not dict or not required <= raw.keys() or not raw.keys() <= known:
            return None
        loaded = {}
        for key, value in raw.items():
            name, check = checks[key]
            result = check(value)
            if result is DEFER:
                return None
            loaded[name] = result
        if size_error(raw, max_bytes):
            return None
        return loaded

    return load
