"""The tracking plan's verdicts against the reference validator: for random plans and payloads, analytics.plan
(jsonschema-rs) lets through exactly what jsonschema, the Python reference of draft 2020-12, calls valid; and what it
says of a violation names paths and rules, never a value."""

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from analytics.plan import UNPLANNED_MESSAGE, TrackingPlan

# Few names, so that payloads often hold the keys the schemas speak of.
NAMES = st.sampled_from(["a", "b", "c", "d~", "e/f"])
# Patterns both regex engines read alike (no \d or \w, whose Unicode meaning differs between them).
PATTERNS = st.sampled_from(["^a", "b$", "^[a-c]*$", "^[0-9]{2,4}$", "x|y"])
SMALL = st.integers(min_value=0, max_value=4)
# Values a value never holds in a schema: a violation's message must never repeat it.
MARKER = "VALUE-7f3a"

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6),
    st.sampled_from(["a", "ab", "b", "abc", "12", "x", MARKER]),
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(NAMES | st.text(max_size=3), children, max_size=4)
    ),
    max_leaves=12,
)
# Values in the plan itself: no marker, and not as deep.
plan_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from(["a", "b", "12"])),
    lambda children: st.lists(children, max_size=2) | st.dictionaries(NAMES, children, max_size=2),
    max_leaves=4,
)
TYPES = st.sampled_from(["null", "boolean", "integer", "number", "string", "array", "object"])


def schemas() -> st.SearchStrategy[Any]:
    """Draft 2020-12 schemas made of the keywords a plan uses, nested."""
    leaf = st.one_of(
        st.booleans(),
        st.fixed_dictionaries({"type": TYPES | st.lists(TYPES, min_size=1, max_size=3, unique=True)}),
        st.fixed_dictionaries({"enum": st.lists(plan_values, min_size=1, max_size=3)}),
        st.fixed_dictionaries({"const": plan_values}),
        st.fixed_dictionaries({}, optional={"minimum": st.integers(-5, 5), "exclusiveMaximum": st.integers(-5, 5)}),
        st.fixed_dictionaries({"multipleOf": st.sampled_from([1, 2, 3])}),
        st.fixed_dictionaries({}, optional={"minLength": SMALL, "maxLength": SMALL, "pattern": PATTERNS}),
        st.fixed_dictionaries({}, optional={"minItems": SMALL, "maxItems": SMALL, "uniqueItems": st.booleans()}),
        st.fixed_dictionaries({}, optional={"minProperties": SMALL, "maxProperties": SMALL}),
        st.fixed_dictionaries({"required": st.lists(NAMES, max_size=3, unique=True)}),
        st.fixed_dictionaries({"dependentRequired": st.dictionaries(NAMES, st.lists(NAMES, max_size=2, unique=True))}),
        st.fixed_dictionaries({"propertyNames": st.fixed_dictionaries({"maxLength": SMALL})}),
    )

    def nest(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.one_of(
            st.fixed_dictionaries(
                {"type": st.just("object")},
                optional={
                    "properties": st.dictionaries(NAMES, children, max_size=3),
                    "required": st.lists(NAMES, max_size=3, unique=True),
                    "additionalProperties": children,
                    "patternProperties": st.dictionaries(PATTERNS, children, max_size=1),
                },
            ),
            st.fixed_dictionaries(
                {},
                optional={
                    "prefixItems": st.lists(children, min_size=1, max_size=2),
                    "items": children,
                    "contains": children,
                    "minContains": SMALL,
                },
            ),
            st.fixed_dictionaries({"allOf": st.lists(children, min_size=1, max_size=2)}),
            st.fixed_dictionaries({"anyOf": st.lists(children, min_size=1, max_size=2)}),
            st.fixed_dictionaries({"oneOf": st.lists(children, min_size=1, max_size=2)}),
            st.fixed_dictionaries({"not": children}),
            st.fixed_dictionaries({"if": children}, optional={"then": children, "else": children}),
            st.fixed_dictionaries(
                {"properties": st.dictionaries(NAMES, children, max_size=2), "unevaluatedProperties": children}
            ),
        )

    return st.recursive(leaf, nest, max_leaves=6)


plans = st.dictionaries(st.sampled_from(["purchase", "click", "view"]), schemas(), min_size=1, max_size=3)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    types=plans,
    event_type=st.sampled_from(["purchase", "click", "view"]),
    payload=st.none() | st.dictionaries(NAMES | st.text(max_size=3), json_values, max_size=5),
    mode=st.sampled_from(["flag", "reject"]),
    unplanned=st.sampled_from(["allow", "flag", "reject"]),
)
def test_verdict_is_the_reference_validators(types, event_type, payload, mode, unplanned):
    """Let through exactly what jsonschema calls valid; otherwise at least one violation, each a pointer into the
    event and a message that repeats no value of the payload."""
    plan = TrackingPlan(types, mode=mode, unplanned=unplanned)
    event: dict[str, Any] = {"type": event_type}
    if payload is not None:
        event["payload"] = payload
    verdict = plan.verdict(event)
    if event_type not in types:
        if unplanned == "allow":
            assert verdict is None
        else:
            assert verdict is not None and verdict.rejects == (unplanned == "reject")
            assert verdict.violations == [{"path": "/type", "message": UNPLANNED_MESSAGE}]
        return
    reference = Draft202012Validator(types[event_type])
    assert (verdict is None) == reference.is_valid({} if payload is None else payload)
    if verdict is not None:
        assert verdict.rejects == (mode == "reject")
        assert verdict.violations
        for violation in verdict.violations:
            assert violation["path"] == "/payload" or violation["path"].startswith("/payload/")
            assert MARKER not in violation["message"]
