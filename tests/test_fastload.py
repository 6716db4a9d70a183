"""The fast loader agrees with marshmallow on every event: same verdict, same loaded data."""

import copy
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError, fields, post_load, pre_load, validates_schema

from analytics.fastload import compile_batch_loader, compile_loader
from analytics.ingest import BATCH_SCHEMA, FAST_LOAD_BATCH
from analytics.schemas import EventSchema
from tests.strategies import events, json_values, timestamps

SCHEMA = EventSchema(max_bytes=300)
FAST_LOAD = compile_loader(SCHEMA, hooks={"within_size": SCHEMA.fits})
FAST_LOAD_ALL = compile_batch_loader(SCHEMA, hooks={"within_size": SCHEMA.all_fit})
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "1000"))

# Handed straight to the loaders, never through a JSON parser: integers of any size.
values = json_values(st.text(max_size=40), st.integers(), max_size=4, max_leaves=12)


@settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(events(values, st.text(max_size=10)))
def test_fast_loader_agrees_with_marshmallow(event):
    """Where the fast loader accepts, marshmallow accepts with the same data; where marshmallow accepts, so does it."""
    try:
        expected = SCHEMA.load(event)
    except ValidationError:
        expected = None
    assert FAST_LOAD(event) == expected


def loaded_one_by_one(raws: list) -> list | None:
    """What marshmallow loads of each event, or None if it refuses any."""
    try:
        return [SCHEMA.load(raw) for raw in raws]
    except ValidationError:
        return None


# Half of them one event: a batch is all valid or not at all, and a single event reaches the corners as often as
# the loader of one event's test does.
event_lists = events(values, st.text(max_size=10)).map(lambda event: [event]) | st.lists(
    events(values, st.text(max_size=10)), max_size=4
)


@settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(event_lists)
def test_fast_loader_of_a_batch_agrees_with_marshmallow(raws):
    """All the events of a batch at once: where marshmallow accepts every one, the batch loader returns the same
    data; where it refuses one, the batch loader returns None and leaves the events as they were sent."""
    expected = loaded_one_by_one(copy.deepcopy(raws))
    sent = copy.deepcopy(raws)
    assert FAST_LOAD_ALL(raws) == expected
    if expected is None:
        assert raws == sent


BOUNDARY_EVENTS = [
    {"type": ""},
    {"type": "t" * 256},
    {"type": "t" * 257},
    {"type": "t", "id": "i" * 128},
    {"type": "t", "id": "i" * 129},
    {"type": "t", "id": None, "userId": None, "sessionId": None, "payload": None, "timestamp": None},
    {"type": None},
    {"payload": {}},
    {"type": "t", "extra": 1},
    {"type": "t", "payload": []},
    {"type": "t", "userId": 1},
    {"type": "t", "timestamp": True},
    {"type": "t", "timestamp": 1716215520},
    {"type": "t", "timestamp": 1716215520123},
    {"type": "t", "timestamp": "2024-05-20T14:32:00+02:00"},
    {"type": "t", "timestamp": "2024-05-20 14:32"},
    {"type": "t", "timestamp": "yesterday"},
    {"type": "t", "timestamp": float("nan")},
    {"type": "t", "timestamp": 10**30},
]


@pytest.mark.parametrize("event", BOUNDARY_EVENTS, ids=repr)
def test_fast_loader_of_a_batch_agrees_at_the_limits(event):
    """Each limit of each field, alone and beside a valid event: the batch loader agrees with marshmallow."""
    valid = {"type": "page_view", "timestamp": "2024-05-20T14:32:00Z"}
    for raws in ([event], [valid, event]):
        assert FAST_LOAD_ALL(copy.deepcopy(raws)) == loaded_one_by_one(copy.deepcopy(raws))


def test_fast_loader_of_a_batch_checks_each_event_size():
    """Events whose list is over the limit are measured one by one: all within it pass, one over it does not."""
    small = {"type": "t", "payload": {"text": "x" * 200}}
    assert FAST_LOAD_ALL([dict(small) for _ in range(3)]) == [SCHEMA.load(small)] * 3
    large = {"type": "t", "payload": {"text": "x" * 300}}
    assert FAST_LOAD_ALL([dict(small), large]) is None


def test_fast_loader_takes_the_common_case():
    """A typical event never falls back to marshmallow: the fast path is really used."""
    event = {
        "type": "page_view",
        "payload": {"url": "/docs", "n": 1},
        "userId": "u",
        "sessionId": "s",
        "id": "e1",
        "timestamp": "2024-05-20T14:32:00Z",
    }
    assert FAST_LOAD(event) == SCHEMA.load(event) != None  # noqa: E711
    assert FAST_LOAD_ALL([copy.deepcopy(event), copy.deepcopy(event)]) == [SCHEMA.load(event)] * 2


def test_unknown_kind_of_field_is_refused():
    """A field the loader cannot derive a check for stops the app from starting, instead of going unchecked."""

    class Extended(EventSchema):
        count = fields.Integer()

    with pytest.raises(TypeError, match="Integer"):
        compile_loader(Extended(max_bytes=100), hooks={"within_size": SCHEMA.fits})


@pytest.mark.parametrize("decorator", [validates_schema, post_load, pre_load])
def test_a_hook_not_given_is_refused(decorator):
    """A schema hook the loader was not given stops the app from starting: the fast path would skip it.

    Checked with the case that motivated it: a subclass rejecting one type is rejected by
    marshmallow, and a loader that ignored the hook would accept it.
    """

    class Forbidding(EventSchema):
        @decorator
        def forbid(self, data: dict, **kwargs: object) -> dict:
            if data.get("type") == "forbidden":
                raise ValidationError("forbidden")
            return data

    schema = Forbidding(max_bytes=1000)
    with pytest.raises(ValidationError):
        schema.load({"type": "forbidden"})
    with pytest.raises(TypeError, match="forbid"):
        compile_loader(schema, hooks={"within_size": schema.fits})
    with pytest.raises(TypeError, match="within_size"):
        compile_loader(EventSchema(max_bytes=1000))


batches = st.one_of(
    st.fixed_dictionaries({}, optional={"events": st.lists(values, max_size=3) | values, "timestamp": timestamps}),
    st.fixed_dictionaries({"events": st.lists(values, max_size=3)}).flatmap(
        lambda batch: st.dictionaries(st.text(max_size=6), values, max_size=2).map(lambda extra: {**extra, **batch})
    ),
    values,
)


@settings(max_examples=EXAMPLES // 2, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(batches)
def test_fast_batch_loader_agrees_with_marshmallow(batch):
    """The batch's fast loader, where it accepts, returns what BatchSchema returns."""
    try:
        expected = BATCH_SCHEMA.load(batch)
    except ValidationError:
        expected = None
    loaded = FAST_LOAD_BATCH(batch)
    assert loaded is None or loaded == expected
    if expected is not None and batch.keys() <= {"events", "timestamp"}:
        assert loaded == expected
