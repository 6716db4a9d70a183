"""Hypothesis strategies the fuzz tests share: JSON values, timestamps in every form a client might send, events.

The events go from nothing like one, through valid ones with some fields wrong, to valid ones with unknown keys
added, so that both the verdicts and the loaded data get exercised.
"""

from typing import Any

from hypothesis import strategies as st

SearchStrategy = st.SearchStrategy

# Text that reaches the awkward corners: line breaks of every kind, NUL, lone surrogates, astral planes.
# Only for what goes through a JSON encoder: a lone surrogate cannot come out of a JSON parser.
awkward_text = st.text(
    st.characters(codec=None, exclude_categories=())
    | st.sampled_from(["\n", "\r", "\u2028", "\u2029", "\x85", "\x00", "\ud800", "\udfff", "\U0001f600", '"', "\\"]),
    max_size=40,
)

timestamps = st.one_of(
    st.datetimes().map(lambda moment: moment.isoformat()),
    st.datetimes(timezones=st.timezones()).map(lambda moment: moment.isoformat()),
    st.integers(min_value=-(10**15), max_value=10**15),
    st.floats(),
    st.booleans(),
    st.sampled_from(["2024-05-20T14:32:00Z", "2024-05-20", "", "soon", "9999-12-31T23:59:59-01:00", None]),
)


def json_values(
    text: SearchStrategy[str], integers: SearchStrategy[int], max_size: int, max_leaves: int
) -> SearchStrategy[Any]:
    """Any JSON value (finite numbers only), its strings and keys drawn from ``text``, containers up to ``max_size``."""
    scalars = st.none() | st.booleans() | integers | st.floats(allow_nan=False, allow_infinity=False) | text
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=max_size) | st.dictionaries(text, inner, max_size=max_size),
        max_leaves=max_leaves,
    )


def events(values: SearchStrategy[Any], text: SearchStrategy[str]) -> SearchStrategy[Any]:
    """Events: any mix of the known fields, each usually plausible and sometimes any value in ``values``;
    a valid type with such fields; that with unknown keys (from ``text``) added; or no object at all."""
    fields = {
        "type": st.text(min_size=1, max_size=20) | text.filter(bool) | st.text(max_size=300) | values,
        "payload": st.dictionaries(text, values, max_size=6) | values,
        "userId": st.text(max_size=20) | values,
        "sessionId": st.text(max_size=20) | values,
        "id": st.text(max_size=140) | values,
        "timestamp": timestamps | values,
    }
    optional = {key: value for key, value in fields.items() if key != "type"}
    typed = st.fixed_dictionaries({"type": st.text(min_size=1, max_size=20)}, optional=optional)
    return st.one_of(
        st.fixed_dictionaries({}, optional=fields),
        typed,
        typed.flatmap(lambda event: st.dictionaries(text, values, max_size=2).map(lambda extra: {**extra, **event})),
        values,
    )
