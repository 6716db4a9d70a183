"""SIGTERM in the middle of load: every 200 is in the log, everything cut off is an error, never a false 200."""

import signal
import threading
from collections import Counter

import orjson

from tests.harness.clients import SlowUpload
from tests.harness.load import expected_answer, make_batches, run_load, summarize

REQUESTS = 2000
SIGNAL_AFTER = 300


def test_sigterm_under_load_acknowledges_only_what_is_written(start_server):
    """SIGTERM to the master mid-load: a request in flight still finishes with 200, cut-off requests fail
    (never a 200 for unwritten events), and stdout holds every acknowledged event exactly once."""
    server = start_server(workers=4)
    in_flight_events = [{"type": "in_flight", "id": f"slow-{n}", "payload": {"n": n}} for n in range(3)]
    upload = SlowUpload(server.port, orjson.dumps({"events": in_flight_events}))
    upload.send(len(upload.data) - 10)
    server.wait_for_worker(upload.port)
    signalled = threading.Event()

    def terminate() -> None:
        server.process.send_signal(signal.SIGTERM)
        signalled.set()

    finished: list = []
    # The worker reading this body gets SIGTERM before the body's last bytes arrive.
    finisher = threading.Thread(target=lambda: (signalled.wait(60), finished.append(upload.finish())))
    finisher.start()
    outcomes = run_load(server.port, make_batches(REQUESTS, tag="term"), after=(SIGNAL_AFTER, terminate))
    finisher.join(60)
    assert server.process.wait(60) == 0
    server.stop()
    lines = server.lines()

    assert [(status, body) for status, _, body in finished] == [(200, {"success": True, "received": 3})], (
        "a request in flight at SIGTERM was not finished"
    )
    answered = [outcome for outcome in outcomes if outcome.error is None]
    cut_off = [outcome for outcome in outcomes if outcome.error is not None]
    assert len(answered) >= SIGNAL_AFTER and cut_off, "SIGTERM did not land in the middle of the load"
    # A 503 with a JSON error is an allowed way to turn a request away; nothing else is.
    assert [summarize(o) for o in answered if o.status != 200 and not (o.status == 503 and "error" in o.body)] == []
    assert [summarize(o) for o in answered if o.status == 200 and summarize(o) != expected_answer(o.batch)] == []

    logged = Counter(line["id"] for line in lines)
    assert {line["kind"] for line in lines} == {"event"}
    assert [event_id for event_id, times in logged.items() if times > 1] == []
    acknowledged = {event_id for o in answered if o.status == 200 for event_id in o.batch.accepted}
    acknowledged |= {event["id"] for event in in_flight_events}
    assert acknowledged - logged.keys() == set(), "acknowledged events missing from the log"
    # What was cut off may have been written just before the connection went, but only whole batches:
    # a batch is one write, so its events are all in the log or none is.
    for outcome in cut_off:
        present = {event_id for event_id in outcome.batch.accepted if event_id in logged}
        assert present in (set(), set(outcome.batch.accepted)), outcome.error
    unacknowledged = {event_id for o in answered if o.status != 200 for event_id in o.batch.ids}
    assert unacknowledged & logged.keys() == set()
