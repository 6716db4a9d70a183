"""Fast loaders derived from the marshmallow schemas, for input that is plainly valid.

marshmallow costs about 12 µs an event, too much for batches of hundreds. A
loader built here reads the schema's own fields and validators and accepts
input only where it can prove the schema would, returning what ``schema.load``
would return. Anything else (wrong type, bad length, unknown key, too large)
goes back to marshmallow, which decides and explains. The hypothesis tests in
tests/test_fastload.py check that the two agree on arbitrary input.

A batch's events are first tried all at once: the same checks, as the type
of a msgspec Struct that msgspec (compiled) converts the whole list to, then
Python only for the fields that convert (timestamps). A batch with anything it
cannot vouch for goes back to the loader of one event, event by event.
"""

import sys
from collections.abc import Callable, Mapping
from typing import Annotated, Any, NamedTuple

import msgspec
from marshmallow import Schema, fields, validate
from marshmallow.decorators import POST_LOAD, PRE_LOAD, VALIDATES, VALIDATES_SCHEMA

from analytics.schemas import JsonArray, Timestamp

# Returned by a field check that cannot vouch for a value.
DEFER = object()

Check = Callable[[Any], Any]


class FieldCheck(NamedTuple):
    """How one field is checked: ``check(value)`` is what the schema loads for ``value``, or DEFER; ``annotation``
    is the type msgspec accepts the same values as (as a batch checks them); ``converts`` says the loaded value
    may differ from the value sent, so ``check`` must run even where msgspec accepts."""

    check: Check
    annotation: Any
    converts: bool = False


def _nullable(annotation: Any, allow_none: bool) -> Any:
    """``annotation``, or None too where the field allows it."""
    return annotation | None if allow_none else annotation


def _string_check(field: fields.String) -> FieldCheck:
    """Accept a str whose length is within the field's Length validators (and None where allowed)."""
    low, high = 0, sys.maxsize
    for validator in field.validators:
        if not isinstance(validator, validate.Length) or validator.equal is not None:
            raise TypeError(f"fastload cannot derive a check for validator {validator!r}")
        low = max(low, validator.min or 0)
        high = min(high, sys.maxsize if validator.max is None else validator.max)
    allow_none = field.allow_none

    def check(value: Any) -> Any:
        if type(value) is str:
            return value if low <= len(value) <= high else DEFER
        return None if value is None and allow_none else DEFER

    length = msgspec.Meta(min_length=low or None, max_length=high if high < sys.maxsize else None)
    return FieldCheck(check, _nullable(Annotated[str, length], allow_none))


def _dict_check(field: fields.Dict) -> FieldCheck:
    """Accept a dict, which the schema loads unchanged when no key or value field is set."""
    if field.key_field is not None or field.value_field is not None or field.validators:
        raise TypeError(f"fastload cannot derive a check for {field!r}")
    allow_none = field.allow_none

    def check(value: Any) -> Any:
        if type(value) is dict:
            return value
        return None if value is None and allow_none else DEFER

    return FieldCheck(check, _nullable(dict, allow_none))


def _timestamp_check(field: Timestamp) -> FieldCheck:
    """Accept what the field itself deserializes, calling its own parser without marshmallow's wrapping."""
    if field.validators:
        raise TypeError(f"fastload cannot derive a check for {field!r}")
    allow_none = field.allow_none
    parse = field.parse

    def check(value: Any) -> Any:
        if value is None:
            return None if allow_none else DEFER
        try:
            return parse(value)
        except ValueError:
            return DEFER

    # Strings and numbers are what it may take (msgspec takes no bool for an int); the check parses them.
    return FieldCheck(check, _nullable(str | int | float, allow_none), converts=True)


def _array_check(field: JsonArray) -> FieldCheck:
    """Accept a list, which the field takes as it is."""
    if field.validators or field.allow_none:
        raise TypeError(f"fastload cannot derive a check for {field!r}")

    def check(value: Any) -> Any:
        return value if type(value) is list else DEFER

    return FieldCheck(check, list)


_CHECK_BUILDERS: dict[type, Callable[[Any], FieldCheck]] = {
    fields.String: _string_check,
    fields.Dict: _dict_check,
    Timestamp: _timestamp_check,
    JsonArray: _array_check,
}


def _field_check(field: fields.Field) -> FieldCheck:
    """Build the check for one field, refusing any kind of field not understood here."""
    builder = _CHECK_BUILDERS.get(type(field))
    if builder is None:
        raise TypeError(f"fastload cannot derive a check for {type(field).__name__}")
    return builder(field)


def _field_checks(schema: Schema) -> dict[str, FieldCheck]:
    """The check of each of the schema's fields, by name."""
    checks = {}
    for name, field in schema.load_fields.items():
        if field.data_key not in (None, name):
            raise TypeError(f"fastload cannot derive a loader for {name!r}: its data_key differs")
        checks[name] = _field_check(field)
    return checks


def _whole_check(schema: Schema, predicates: Mapping[str, Callable[[Any], bool]]) -> Callable[[Any], bool] | None:
    """The schema's load hooks as one predicate over the raw input, refusing any hook not given as a predicate.

    A hook runs code the loader cannot see: a ``@validates_schema`` added later
    would otherwise be skipped by the fast path without a word. Only
    schema-level validators can be stood in for (by a predicate that accepts
    what they accept); pre- and post-load hooks change the data, so none is taken.
    """
    hooks = type(schema).resolve_hooks()
    for tag in (PRE_LOAD, POST_LOAD, VALIDATES, VALIDATES_SCHEMA):
        for name, _, _ in hooks.get(tag, ()):
            if tag != VALIDATES_SCHEMA or name not in predicates:
                raise TypeError(f"fastload cannot derive a loader for {type(schema).__name__}: its {tag} hook {name}")
    checks = [predicates[name] for name, _, _ in hooks.get(VALIDATES_SCHEMA, ())]
    if len(checks) < 2:
        return checks[0] if checks else None
    return lambda raw: all(check(raw) for check in checks)


def compile_loader(
    schema: Schema, hooks: Mapping[str, Callable[[dict], bool]] | None = None
) -> Callable[[Any], dict | None]:
    """Return ``load(raw)``: what ``schema.load(raw)`` returns, or None to let marshmallow decide.

    ``hooks`` maps the name of each of the schema's ``@validates_schema``
    methods to a predicate on the raw input that holds where the hook passes;
    any other hook makes this refuse the schema. Unknown keys always defer,
    whatever the schema's unknown policy, so marshmallow applies it.
    """
    checks = {name: field_check.check for name, field_check in _field_checks(schema).items()}
    whole = _whole_check(schema, hooks or {})
    required = frozenset(name for name, field in schema.load_fields.items() if field.required)
    known = frozenset(checks)

    def load(raw: Any) -> dict | None:
        if type(raw) is not dict or not required <= raw.keys() or not raw.keys() <= known:
            return None
        loaded = dict(raw)
        for key, value in raw.items():
            result = checks[key](value)
            if result is not value:
                if result is DEFER:
                    return None
                loaded[key] = result
        if whole is not None and not whole(raw):
            return None
        return loaded

    return load


def compile_batch_loader(
    schema: Schema, hooks: Mapping[str, Callable[[list], bool]] | None = None
) -> Callable[[list], list[dict] | None]:
    """Return ``load_all(raws)``: what ``schema.load`` returns for each of ``raws``, or None unless it can vouch
    for every one of them (then each goes to the loader of one event).

    ``hooks`` are as ``compile_loader``'s, but each predicate takes the whole list and holds where the hook
    passes for every event in it. ``load_all`` loads in place: the dicts it returns are those of ``raws``.
    """
    checks = _field_checks(schema)
    whole = _whole_check(schema, hooks or {})
    required = {name for name, field in schema.load_fields.items() if field.required}
    # An optional field's default only stands for its absence: a null sent is checked against its annotation.
    struct = msgspec.defstruct(
        f"{type(schema).__name__}Struct",
        [
            (name, check.annotation) if name in required else (name, check.annotation, None)
            for name, check in checks.items()
        ],
        # Unknown keys always defer, as in compile_loader.
        forbid_unknown_fields=True,
    )
    events_type = list[struct]
    converting = [(name, check.check) for name, check in checks.items() if check.converts]

    def load_all(raws: list) -> list[dict] | None:
        try:
            msgspec.convert(raws, events_type)
        except msgspec.ValidationError:
            return None
        if whole is not None and not whole(raws):
            return None
        # Every value converted first and only then stored: a batch handed on must reach the other loader as sent.
        converted = []
        for name, check in converting:
            for raw in raws:
                if name in raw:
                    value = raw[name]
                    result = check(value)
                    if result is not value:
                        if result is DEFER:
                            return None
                        converted.append((raw, name, result))
        for raw, name, result in converted:
            raw[name] = result
        return raws

    return load_all
