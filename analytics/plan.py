"""The tracking plan: a JSON Schema (draft 2020-12) per event type for its payload, checked as events arrive.

TRACKING_PLAN names a JSON file mapping each event ``type`` to the schema of
that type's ``payload``. It is read, checked and compiled once, at start: a
file that does not parse, or a schema that is not a valid 2020-12 schema,
stops the start with one line naming the type and the error. Per event the
check is one dictionary look-up and one call into the compiled validator;
only an event that fails is looked at again, to explain why.

The validator is jsonschema-rs (Rust, all of draft 2020-12, every error with
its kind and location). Measured on the bench's events against a ten-type
plan (docs/tracking-plan.md): 0.5 µs a valid payload, against 1.2 µs for
fastjsonschema (which knows drafts 4 to 7 only, so ignores ``prefixItems``,
``dependentRequired``, ``unevaluatedProperties`` and accepts what they refuse,
and stops at the first error) and 27 µs for jsonschema, the reference, which
the tests compare it with.

Violations are described by the rule and the path, never by the value: the
payload is checked as the client sent it, before redaction, and a value
under a secret-named key must not come back in an answer or reach a line.
Paths (client-chosen keys), messages and the list are all bounded, so a
line stays within its allowance (analytics.lines.CONTEXT_ALLOWANCE).
"""

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from analytics.lines import encode
from config import SettingsError

if TYPE_CHECKING:
    # Imported where a plan is compiled and explained, and only then: loaded, it holds 3 MiB of a worker's memory.
    import jsonschema_rs

DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"
# Event types are 1 to 256 characters (analytics.schemas.EventSchema): a longer name could never match.
MAX_TYPE_LENGTH = 256

# Bounds of what one event's violations add to its line and to the answer: at most this many listed,
# paths and messages cut to these lengths, and the whole list at most this many bytes as the line holds it.
MAX_VIOLATIONS = 10
MAX_PATH_CHARS = 128
MAX_MESSAGE_CHARS = 160
MAX_VIOLATIONS_BYTES = 1024
# jsonschema-rs works out every error of a payload before it hands over the first, at a cost that grows faster
# than their number (3 µs an error for ten, 20 µs each for a hundred or more: 0.3 s for an array of sixteen
# thousand). So every violation is listed only for payloads up to MAX_EXPLAINED_BYTES as compact JSON, and for
# at most EXPLAINED_BYTES_PER_REQUEST of them per request; past that, those of the first error alone
# (``validate`` stops there, in microseconds). Payloads of 50 to 200 bytes get every violation listed, for 20 to
# 80 events a request; tests/test_plan.py holds the worst bodies to what tests/test_bounds.py allows any body.
MAX_EXPLAINED_BYTES = 256
EXPLAINED_BYTES_PER_REQUEST = 4096
CUT = "…"

UNPLANNED_MESSAGE = "Not a type in the tracking plan."
MORE = {"path": "/payload", "message": "More violations, not listed."}
FIRST_ONLY = {"path": "/payload", "message": "Only the first violations found are listed; there may be more."}
# Room kept for the last word of a list, whichever it is.
_MARKER_BYTES = max(len(encode(MORE)), len(encode(FIRST_ONLY))) + 1


class _NoRemoteReferences:
    """The retriever of schemas a ``$ref`` names outside the plan: none is fetched (no network at start)."""

    def __call__(self, uri: str) -> Any:
        raise ValueError(f"references outside the plan are not followed ({uri[:MAX_PATH_CHARS]})")


def _cut(text: str, limit: int) -> str:
    """``text``, or its start and an ellipsis when longer than ``limit`` characters."""
    return text if len(text) <= limit else text[: limit - 1] + CUT


def _json(value: Any) -> str:
    """A value from the plan (a limit, an enum's options) as JSON text."""
    return orjson.dumps(value).decode()


def pointer(segments: Any) -> str:
    """The JSON pointer (RFC 6901) of the event's payload member at ``segments``, cut to MAX_PATH_CHARS."""
    path = "/payload" + "".join("/" + str(segment).replace("~", "~0").replace("/", "~1") for segment in segments)
    return _cut(path, MAX_PATH_CHARS)


# Keywords whose members are named by the plan's author: a segment after one of them is a name, not a keyword.
_NAMING = frozenset({"properties", "patternProperties", "$defs", "dependentSchemas", "dependentRequired"})


def _keyword(error: "jsonschema_rs.ValidationError") -> str:
    """The keyword of the schema that failed: the last keyword of the schema path (a property named like one
    is not taken for it)."""
    keyword, naming = "schema", False
    for segment in error.schema_path:
        if naming:
            naming = False
        elif isinstance(segment, str):
            keyword, naming = segment, segment in _NAMING
    return keyword


_LIMITS = {
    "minimum": "Must be greater than or equal to {}.",
    "exclusiveMinimum": "Must be greater than {}.",
    "maximum": "Must be less than or equal to {}.",
    "exclusiveMaximum": "Must be less than {}.",
    "minLength": "Shorter than minimum length {}.",
    "maxLength": "Longer than maximum length {}.",
    "minItems": "Fewer items than the minimum of {}.",
    "maxItems": "More items than the maximum of {}.",
    "minProperties": "Fewer fields than the minimum of {}.",
    "maxProperties": "More fields than the maximum of {}.",
}
_FIXED = {
    "uniqueItems": "Items must be unique.",
    "not": "Must not match the schema under not.",
    "anyOf": "Matches none of the schemas under anyOf.",
    "falseSchema": "Not allowed.",
    "unevaluatedItems": "Items past those the schema describes are not allowed.",
}


def _member(payload: Any, segments: list) -> Any:
    """The member of ``payload`` at ``segments`` (from an error's instance path)."""
    for segment in segments:
        payload = payload[segment]
    return payload


def _described(error: "jsonschema_rs.ValidationError", payload: Any) -> Iterator[tuple[list, str]]:
    """The violations one validator error stands for: (path segments within the payload, message).

    Messages in marshmallow's words where it has them, naming the rule and the
    plan's own limits; never the value, which may be a secret.
    """
    kind = error.kind
    name = kind.name
    path = error.instance_path
    if name == "required":
        yield [*path, kind.property], "Missing data for required field."
    elif name in ("additionalProperties", "unevaluatedProperties"):
        for key in kind.unexpected:
            yield [*path, key], "Unknown field."
    elif name == "type":
        yield path, f"Not a valid {' or '.join(kind.types)}."
    elif name in _LIMITS:
        yield path, _LIMITS[name].format(_json(kind.limit))
    elif name == "falseSchema" and _keyword(error) in ("additionalProperties", "unevaluatedProperties"):
        # Without properties or patternProperties beside it, jsonschema-rs reports `additionalProperties: false`
        # once, for the object, rather than per key: every key of the object is unknown.
        member = _member(payload, path)
        for key in member if isinstance(member, dict) else ():
            yield [*path, key], "Unknown field."
    elif name in _FIXED:
        yield path, _FIXED[name]
    elif name == "enum":
        yield path, f"Must be one of: {', '.join(map(_json, kind.options))}."
    elif name == "const":
        yield path, f"Must be equal to {_json(kind.expected_value)}."
    elif name == "pattern":
        yield path, f"String does not match expected pattern {_json(kind.pattern)}."
    elif name == "format":
        yield path, f"Not a valid {kind.format}."
    elif name == "multipleOf":
        yield path, f"Must be a multiple of {_json(kind.multiple_of)}."
    elif name == "oneOf":
        several = all(not errors for errors in kind.context)
        yield path, f"Matches {'more than one' if several else 'none'} of the schemas under oneOf."
    elif name == "propertyNames":
        key = kind.error.instance
        yield [*path, key] if isinstance(key, str) else path, "Field name not allowed by propertyNames."
    else:
        # contains, minContains, maxContains, dependentSchemas' own failures and the rest: the keyword says it.
        yield path, f"Does not satisfy {_keyword(error)}."


def _bounded(violations: list[dict[str, str]], marker: dict[str, str] | None) -> list[dict[str, str]]:
    """``violations`` within MAX_VIOLATIONS_BYTES as a line holds them, then ``marker``; MORE if some had to be left
    out and there is no marker."""
    kept: list[dict[str, str]] = []
    room = MAX_VIOLATIONS_BYTES - _MARKER_BYTES - 2
    for violation in violations:
        size = len(encode(violation)) + 1
        if size > room:
            marker = marker or MORE
            break
        kept.append(violation)
        room -= size
    if marker:
        kept.append(marker)
    return kept


@dataclass(frozen=True)
class Verdict:
    """What the plan says of one event: rejected or only flagged, and its violations (path and message each)."""

    rejects: bool
    violations: list[dict[str, str]]

    def errors(self) -> dict[str, list[str]]:
        """The violations as a ``rejected`` entry's errors: messages by path."""
        errors: dict[str, list[str]] = {}
        for violation in self.violations:
            errors.setdefault(violation["path"], []).append(violation["message"])
        return errors


class TrackingPlan:
    """The plan in force: its schemas compiled, the modes, and its document for GET /api/tracking-plan."""

    def __init__(self, types: Mapping[str, Any], mode: str = "flag", unplanned: str = "flag") -> None:
        self.mode = mode
        self.unplanned = unplanned
        self._validators = {name: _compile(name, schema) for name, schema in types.items()}
        self._rejects = mode == "reject"
        if mode == "off" or unplanned == "allow":
            self._unplanned_verdict = None
        else:
            self._unplanned_verdict = Verdict(unplanned == "reject", [{"path": "/type", "message": UNPLANNED_MESSAGE}])
        self.document = orjson.dumps({"mode": mode, "unplanned": unplanned, "types": types})

    @property
    def enforced(self) -> bool:
        """Whether events are checked at all (a plan in mode ``off`` is only served)."""
        return self.mode != "off"

    def for_request(self) -> Callable[[Mapping[str, Any]], Verdict | None]:
        """``verdict(event)`` for the events of one request, listing every violation of a payload within the
        request's EXPLAINED_BYTES_PER_REQUEST."""
        validators = self._validators
        unplanned = self._unplanned_verdict
        rejects = self._rejects
        budget = EXPLAINED_BYTES_PER_REQUEST

        def verdict(event: Mapping[str, Any]) -> Verdict | None:
            """What the plan says of a (shape-valid) event; None when it lets it through unmarked.

            An event without a payload is checked as having an empty one.
            """
            nonlocal budget
            validator = validators.get(event["type"])
            if validator is None:
                return unplanned
            payload = event.get("payload")
            if payload is None:
                payload = {}
            if validator.is_valid(payload):
                return None
            size = len(encode(payload))
            if size <= MAX_EXPLAINED_BYTES and size <= budget:
                budget -= size
                return Verdict(rejects, _every_violation(validator, payload))
            return Verdict(rejects, _first_violation(validator, payload))

        return verdict

    def verdict(self, event: Mapping[str, Any]) -> Verdict | None:
        """What the plan says of one event, as a request of its own."""
        return self.for_request()(event)


def _violation(segments: Any, message: str) -> dict[str, str]:
    """A violation as lines and answers hold it, bounded."""
    return {"path": pointer(segments), "message": _cut(message, MAX_MESSAGE_CHARS)}


def _every_violation(validator: Any, payload: Any) -> list[dict[str, str]]:
    """The violations of ``payload``: the first MAX_VIOLATIONS, within MAX_VIOLATIONS_BYTES."""
    violations = []
    for error in validator.iter_errors(payload):
        violations.extend(_violation(segments, message) for segments, message in _described(error, payload))
        if len(violations) > MAX_VIOLATIONS:
            break
    return _bounded(violations[:MAX_VIOLATIONS], MORE if len(violations) > MAX_VIOLATIONS else None)


def _first_violation(validator: Any, payload: Any) -> list[dict[str, str]]:
    """The violations of the first error of ``payload`` only, and a word saying so: ``validate`` stops at it."""
    import jsonschema_rs

    try:
        validator.validate(payload)
    except jsonschema_rs.ValidationError as error:
        error.__traceback__ = None  # it holds the frame, which holds it: no cycle left for the collector
        violations = [_violation(segments, message) for segments, message in _described(error, payload)]
    else:  # pragma: no cover - is_valid said it is not: the two calls cannot disagree
        violations = []
    return _bounded(violations[:MAX_VIOLATIONS], FIRST_ONLY)


def _compile(name: str, schema: Any) -> Any:
    """The validator of one type's schema; a SettingsError naming the type when the schema is not valid."""
    import jsonschema_rs

    where = f"TRACKING_PLAN: type {_cut(name, 64)!r}"
    if not isinstance(schema, dict | bool):
        raise SettingsError(f"{where}: its schema must be a JSON object or a boolean, not {type(schema).__name__}")
    if isinstance(schema, dict) and schema.get("$schema", DRAFT_2020_12) != DRAFT_2020_12:
        raise SettingsError(f"{where}: $schema must be {DRAFT_2020_12} (draft 2020-12) or absent")
    try:
        return jsonschema_rs.Draft202012Validator(
            schema, validate_formats=True, ignore_unknown_formats=False, retriever=_NoRemoteReferences()
        )
    except (jsonschema_rs.ValidationError, jsonschema_rs.ReferencingError, ValueError) as error:
        message = getattr(error, "message", None) or str(error)
        location = pointer(getattr(error, "instance_path", ())).removeprefix("/payload") or "the schema's root"
        raise SettingsError(f"{where}: {message.splitlines()[0]} (at {location})") from None


def read_plan(path: str) -> dict[str, Any]:
    """The types of the plan file at ``path``; a SettingsError saying what is wrong with it."""
    try:
        text = Path(path).read_bytes()
    except OSError as error:
        raise SettingsError(f"TRACKING_PLAN: cannot read {path!r}: {error.strerror or error}") from None
    try:
        types = orjson.loads(text)
    except orjson.JSONDecodeError as error:
        raise SettingsError(f"TRACKING_PLAN: {path!r} is not JSON: {error}") from None
    if not isinstance(types, dict) or not types:
        raise SettingsError(f"TRACKING_PLAN: {path!r} must be a JSON object mapping event types to schemas")
    for name in types:
        if not 1 <= len(name) <= MAX_TYPE_LENGTH:
            raise SettingsError(f"TRACKING_PLAN: type {_cut(name, 64)!r} must be 1 to {MAX_TYPE_LENGTH} characters")
    return types


def plan_from_settings(settings: Mapping[str, Any]) -> TrackingPlan:
    """The plan TRACKING_PLAN names, with its modes (settings already checked); without one, an empty plan, off."""
    if not settings["TRACKING_PLAN"]:
        return TrackingPlan({}, mode="off", unplanned="allow")
    types = read_plan(settings["TRACKING_PLAN"])
    return TrackingPlan(types, mode=settings["TRACKING_PLAN_MODE"], unplanned=settings["TRACKING_PLAN_UNPLANNED"])
