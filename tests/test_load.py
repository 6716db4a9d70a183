"""Load with exact accounting: real gunicorn, 4 workers, thousands of concurrent requests, every event counted."""

from collections import Counter

import orjson

from tests.harness.load import MAX_EVENT_BYTES, expected_answer, make_batches, run_load, summarize

REQUESTS = 3000


def test_every_acknowledged_event_is_logged_exactly_once_under_load(start_server):
    """Thousands of concurrent mixed batches: each answer is exact, and stdout holds each accepted event once, whole."""
    server = start_server(workers=4)
    batches = make_batches(REQUESTS, tag="load")
    outcomes = run_load(server.port, batches, concurrency=64)

    failed = [
        (outcome.error, summarize(outcome))
        for outcome in outcomes
        if summarize(outcome) != expected_answer(outcome.batch)
    ]
    assert failed == []
    # Every line is read only once gunicorn has exited: nothing can still be on its way.
    assert server.stop() == 0
    lines = server.lines()

    assert {line["kind"] for line in lines} == {"event"}
    logged = Counter(line["id"] for line in lines)
    assert [event_id for event_id, times in logged.items() if times > 1] == []
    acknowledged = {event_id: outcome for outcome in outcomes for event_id in outcome.batch.accepted}
    assert logged.keys() == acknowledged.keys()
    for line in lines:
        outcome = acknowledged[line["id"]]
        sent = outcome.batch.accepted[line["id"]]
        assert (line["type"], line["payload"], line["request_id"]) == (
            sent["type"],
            sent["payload"],
            outcome.request_id,
        )
    # The mix did what it is for: events at the per-event limit, rejections, thousands of lines.
    assert sum(len(batch.rejected) for batch in batches) > 0
    sizes = Counter(len(orjson.dumps(event)) for batch in batches for event in batch.accepted.values())
    assert sizes[MAX_EVENT_BYTES] > 10
    assert len(lines) > 20 * REQUESTS
