"""The NATS JetStream sink against real nats-server and real gunicorn: what the stream holds, byte for byte,
retries, the engine away at start and mid-run, a stream that cannot take the subject, bad settings, SIGTERM."""

import asyncio
import json
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from analytics.jetstream import _Connection, message_id, subject_matches
from app import create_app
from tests.harness.clients import send
from tests.harness.engines import UNAVAILABLE, get, post, stderr_lines, stdout_lines, wait_for
from tests.harness.gunicorn import refusal, run_gunicorn
from tests.harness.load import expected_answer, make_batches, run_load, summarize
from tests.harness.nats import NatsServer, delete_stream, put_stream, read_stream, running_server, stream_info

STREAM = "ANALYTICS"
SUBJECT = "analytics.events"


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A real nats-server with JetStream, stopped after the test."""
    with running_server(tmp_path) as server:
        yield server


def nats_env(nats: NatsServer, sinks: str = "nats", **settings: str) -> dict[str, str]:
    """The environment of a gunicorn whose sinks are ``sinks``, the NATS ones on ``nats``."""
    env = {"ANALYTICS_SINKS": sinks, "ANALYTICS_NATS_SERVERS": nats.url}
    env.update({f"ANALYTICS_{name}": value for name, value in settings.items()})
    return env


@pytest.mark.parametrize(
    ("pattern", "subject", "covered"),
    [
        ("analytics.events", "analytics.events", True),
        ("analytics.*", "analytics.events", True),
        ("analytics.>", "analytics.events", True),
        (">", "analytics.events", True),
        ("*.events", "analytics.events", True),
        ("analytics", "analytics.events", False),
        ("analytics.events.>", "analytics.events", False),
        ("analytics.*", "analytics.events.web", False),
        ("analytics.>", "analytics", False),
        ("*", "analytics.events", False),
        ("other.>", "analytics.events", False),
    ],
)
def test_subject_coverage(pattern, subject, covered):
    """A stream's subject covers ours by NATS's rules: "*" is one token, ">" one or more at the end."""
    assert subject_matches(pattern, subject) is covered


def test_message_ids_are_ids_as_they_are_or_encoded_one_to_one():
    """Plain ids travel as they are; one nats-py would strip or fold (spaces, line breaks) or that is not ASCII is
    percent-encoded, and "%" always is, so two different ids never share a Nats-Msg-Id."""
    assert message_id({"id": "0f8e2c4a-7b1d-4e2a-9c3f-5d6e7f8a9b0c"}) == "0f8e2c4a-7b1d-4e2a-9c3f-5d6e7f8a9b0c"
    assert message_id({"id": "evt:42/a_b.c"}) == "evt:42/a_b.c"
    assert message_id({"id": "a b"}) == "a%20b"
    assert message_id({"type": "no_id"}) is None
    tricky = ["a b", "a%20b", "a\nb", "a\rb", " a", "a", "a ", "é", "%C3%A9", "a\tb", "a\x00b"]
    encoded = [message_id({"id": event_id}) for event_id in tricky]
    assert len(set(encoded)) == len(tricky)
    assert all(value.isascii() and value.isprintable() and " " not in value for value in encoded)


def test_acknowledgements_are_read_alike_however_the_reads_cut_the_bytes():
    """The sink's parser hands on every acknowledgement (stored, a duplicate, refused, no responders) and leaves
    other messages to nats-py, the same whether the server's bytes come in one read, in two cut anywhere (a
    frame split between reads), or a byte at a time."""

    def ack(batch: int, index: int, body: bytes) -> bytes:
        return b"MSG _INBOX.x.%d.%d 7 %d\r\n%s\r\n" % (batch, index, len(body), body)

    refused = b'{"error":{"code":503,"err_code":10008,"description":"no leader"}}'
    received = (
        ack(1, 0, b'{"stream":"S","seq":1}')
        + ack(1, 1, b'{"stream":"S","seq":2,"duplicate":true}')
        # Another subscription's message (the JetStream API's answers come so): nats-py's, not the sink's.
        + b"MSG _INBOX.api.1 3 2\r\n{}\r\n"
        + b"HMSG _INBOX.x.2.0 7 16 16\r\nNATS/1.0 503\r\n\r\n\r\n"
        + ack(3, 0, refused)
        # With a reply subject, which acknowledgements do not have: read the general way, still the sink's.
        + b"MSG _INBOX.x.3.1 7 _INBOX.reply 2\r\n{}\r\n"
    )
    expected = [
        (b"_INBOX.x.1.0", b'{"stream":"S","seq":1}', None),
        (b"_INBOX.x.1.1", b'{"stream":"S","seq":2,"duplicate":true}', None),
        (b"_INBOX.x.2.0", b"", b"NATS/1.0 503\r\n\r\n"),
        (b"_INBOX.x.3.0", refused, None),
        (b"_INBOX.x.3.1", b"{}", None),
    ]

    async def read(pieces: list[bytes]) -> list[tuple[bytes, bytes, bytes | None]]:
        handed: list[tuple[bytes, bytes, bytes | None]] = []
        connection = _Connection(lambda subject, data, headers: handed.append((subject, data, headers)))
        connection.ack_sid = 7
        for piece in pieces:
            await connection._ps.parse(piece)
        assert connection._ps.buf == bytearray()
        return handed

    async def every_cut() -> None:
        assert await read([received]) == expected
        for cut in range(1, len(received)):
            assert await read([received[:cut], received[cut:]]) == expected, cut
        assert await read([received[at : at + 1] for at in range(len(received))]) == expected

    asyncio.run(every_cut())


def test_building_the_app_starts_nothing_until_first_use(nats_server):
    """create_app (which gunicorn's master runs before forking) starts no thread and no connection; the first use
    in a process starts one thread, which waits for its first try to connect; close ends it."""
    before = set(threading.enumerate())
    app = create_app({"TESTING": True, "SINKS": ["nats"], "NATS_SERVERS": [nats_server.url]})
    assert set(threading.enumerate()) == before
    sink = app.extensions["jetstream"]
    try:
        assert sink.unready_reason() is None
        assert [thread.name for thread in set(threading.enumerate()) - before] == ["nats-sink"]
    finally:
        sink.close()
    assert set(threading.enumerate()) == before


def test_stdout_and_nats_sinks_agree_byte_for_byte(start_server, nats_server):
    """With both sinks every accepted event is one message on the subject whose body is exactly its stdout line,
    its id as Nats-Msg-Id (none without an id); the stream is created with file storage, one replica, the window."""
    server = start_server(workers=2, env=nats_env(nats_server, sinks="stdout,nats"))
    batches = [
        [{"type": "page_view", "id": f"agree-{n}", "payload": {"n": n}} for n in range(100)],
        [{"type": "no_id", "payload": {"text": "line\u2028separator, é, \U0001f600"}}],
        [{"type": "big", "id": "agree-big", "payload": {"blob": "b" * 30_000}}, {"type": "plain"}],
        [{"type": "spaced id", "id": "a b\nc"}],
    ]
    for events in batches:
        status, _, body = post(server, events)
        assert (status, body) == (200, {"success": True, "received": len(events)})
    assert server.stop() == 0

    lines = stdout_lines(server)
    messages = read_stream([nats_server.url], STREAM)
    assert len(lines) == sum(len(events) for events in batches)
    assert Counter(message.data for message in messages) == Counter(lines)
    assert {message.subject for message in messages} == {SUBJECT}
    for message in messages:
        event = json.loads(message.data)
        assert message.headers.get("Nats-Msg-Id") == message_id(event)
    assert sum("Nats-Msg-Id" not in message.headers for message in messages) == 2
    assert next(m for m in messages if b"a b\\nc" in m.data).headers["Nats-Msg-Id"] == "a%20b%0Ac"
    config = stream_info([nats_server.url], STREAM).config
    assert (config.subjects, config.storage, config.num_replicas) == ([SUBJECT], "file", 1)
    assert config.duplicate_window == 120


def test_nats_alone_retries_add_nothing_and_stdout_stays_empty(start_server, nats_server):
    """Without stdout in SINKS no event line reaches stdout or stderr; a retried batch with ids adds nothing to
    the stream, while events without an id are stored again (as documented); the window setting is applied."""
    server = start_server(workers=2, env=nats_env(nats_server, NATS_DUPLICATE_WINDOW="30"))
    with_ids = [{"type": "retry", "id": f"retry-{n}"} for n in range(20)]
    without_ids = [{"type": "anonymous", "payload": {"n": n}} for n in range(3)]
    for events in (with_ids, with_ids, without_ids, without_ids):
        status, _, body = post(server, events)
        assert (status, body) == (200, {"success": True, "received": len(events)})
    assert server.stop() == 0

    messages = read_stream([nats_server.url], STREAM)
    stored = Counter(json.loads(message.data).get("id") for message in messages)
    assert stored == {**{event["id"]: 1 for event in with_ids}, None: 6}
    assert bytes(server.stdout) == b""
    assert [line for line in stderr_lines(server) if line.get("kind") == "event"] == []
    assert stream_info([nats_server.url], STREAM).config.duplicate_window == 30


def test_engine_down_at_start(start_server, tmp_path):
    """With no engine the workers boot all the same; batches get 503 with Retry-After and /readyz says why; once
    the engine is up the stream is created and batches are taken."""
    nats = NatsServer(tmp_path)
    server = start_server(workers=1, env=nats_env(nats))
    status, headers, body = post(server, [{"type": "early", "id": "early-1"}])
    assert ((status, body), headers.get("Retry-After")) == (UNAVAILABLE, "5")
    assert get(server, "/readyz") == (
        503,
        {"error": "Not ready", "reason": f"NATS not connected (connecting to {nats.url})"},
    )
    assert get(server, "/healthz") == (200, {"status": "ok"})

    nats.start()
    try:
        wait_for(lambda: get(server, "/readyz")[0] == 200, 30, "the worker was not ready once NATS was up")
        status, _, body = post(server, [{"type": "late", "id": "late-1"}])
        assert (status, body) == (200, {"success": True, "received": 1})
        assert [json.loads(message.data)["id"] for message in read_stream([nats.url], STREAM)] == ["late-1"]
    finally:
        nats.stop()


class RetryingClient(threading.Thread):
    """Posts batches of new events with ids, each retried on a 503 until it gets a 200, as analytics.js does."""

    def __init__(self, port: int, name: str, stop: threading.Event, deadline: float) -> None:
        super().__init__(daemon=True)
        self.port, self.tag, self.stop_sending, self.deadline = port, name, stop, deadline
        self.answers: list[tuple[int, str | None, Any]] = []
        # The ids of every batch that got its 200.
        self.acknowledged: list[str] = []
        self.unfinished: list[str] = []

    def run(self) -> None:
        number = 0
        while not self.stop_sending.is_set() and time.monotonic() < self.deadline:
            events = [{"type": "load", "id": f"{self.tag}-{number}-{index}"} for index in range(1 + number % 7)]
            number += 1
            body = orjson.dumps({"events": events})
            while time.monotonic() < self.deadline:
                status, headers, answer = send(self.port, body)
                self.answers.append((status, headers.get("Retry-After"), answer))
                if status == 200:
                    self.acknowledged.extend(event["id"] for event in events)
                    break
                # Not Retry-After's 5 s: the test would last minutes.
                time.sleep(0.05)
            else:
                self.unfinished.extend(event["id"] for event in events)

    def count(self, status: int) -> int:
        return sum(answer[0] == status for answer in self.answers)


def test_engine_down_mid_run_recovers_and_loses_nothing(start_server, nats_server):
    """NATS killed (SIGKILL) under load and started again on the same port and store: meanwhile only 503s with
    Retry-After and /readyz failing, then 200s again; every event of every batch is in the stream exactly once."""
    server = start_server(workers=2, env=nats_env(nats_server))
    stop = threading.Event()
    clients = [RetryingClient(server.port, f"c{n}", stop, time.monotonic() + 120) for n in range(4)]
    for client in clients:
        client.start()
    try:
        wait_for(lambda: sum(c.count(200) for c in clients) >= 100, 60, "100 batches were not taken")
        nats_server.kill()
        wait_for(lambda: sum(c.count(503) for c in clients) >= 20, 60, "no 503s while NATS was down")
        readyz_down = get(server, "/readyz")
        taken_before = sum(c.count(200) for c in clients)
        nats_server.start()
        wait_for(lambda: sum(c.count(200) for c in clients) >= taken_before + 100, 60, "no recovery")
    finally:
        stop.set()
        for client in clients:
            client.join(60)

    assert readyz_down[0] == 503 and readyz_down[1]["reason"].startswith("NATS not connected (reconnecting")
    answers = [answer for client in clients for answer in client.answers]
    assert {status for status, _, _ in answers} == {200, 503}
    assert [body for status, _, body in answers if (status, body) != UNAVAILABLE and status != 200] == []
    assert {retry_after for status, retry_after, _ in answers if status == 503} == {"5"}
    assert [event_id for client in clients for event_id in client.unfinished] == []
    acknowledged = Counter(event_id for client in clients for event_id in client.acknowledged)
    stored = Counter(json.loads(message.data)["id"] for message in read_stream([nats_server.url], STREAM))
    assert stored == acknowledged
    assert set(acknowledged.values()) == {1}


def all_stopped(pid: int) -> bool:
    """Whether every thread of process ``pid`` is stopped (state T in /proc)."""
    tasks = Path(f"/proc/{pid}/task")
    return all((task / "stat").read_text().rpartition(")")[2].split()[0] == "T" for task in tasks.iterdir())


def test_acknowledgements_missing_past_the_ack_timeout_are_a_503_then_the_retry_is_taken(start_server, nats_server):
    """A server that takes the messages but answers nothing (stopped, its connection still open) makes the batch a
    503 once NATS_ACK_TIMEOUT has passed, the reason naming the acknowledgements missing; once it runs again its
    late answers are dropped, the next batch is taken on the same connection, and the retried events, stored
    meanwhile, are stored once."""
    server = start_server(workers=1, env=nats_env(nats_server, NATS_ACK_TIMEOUT="1.0"))
    wait_for(lambda: get(server, "/readyz")[0] == 200, 30, "not ready")
    events = [{"type": "late", "id": f"late-{n}"} for n in range(3)]
    assert nats_server.process
    nats_server.process.send_signal(signal.SIGSTOP)
    try:
        # Each thread stops as it next runs, and one busy in a disk write (the store's) only once that is done: on a
        # busy machine the server could still answer the batch. Only with every thread stopped can it answer nothing.
        wait_for(lambda: all_stopped(nats_server.process.pid), 10, "every thread of nats-server stopped")
        status, headers, body = post(server, events)
    finally:
        nats_server.process.send_signal(signal.SIGCONT)
    assert ((status, body), headers.get("Retry-After")) == (UNAVAILABLE, "5")
    # Retried as a client would: on a busy machine the server, just resumed, may take longer than the timeout.
    after = {"type": "after", "id": "after-1"}
    taken = {"success": True, "received": 1}
    wait_for(lambda: post(server, [after])[::2] == (200, taken), 30, "no batch taken once the server ran again")
    taken = {"success": True, "received": 3}
    wait_for(lambda: post(server, events)[::2] == (200, taken), 30, "the retried batch was not taken")
    stored = Counter(json.loads(message.data)["id"] for message in read_stream([nats_server.url], STREAM))
    assert stored == Counter([event["id"] for event in events] + ["after-1"])
    assert server.stop() == 0
    reasons = [line["reason"] for line in stderr_lines(server) if line.get("event") == "event_store_unavailable"]
    assert reasons[0] == "3 of 3 JetStream acknowledgements did not arrive within 1.0 s", reasons
    assert all(re.fullmatch(r"\d of \d JetStream acknowledgements did not arrive within 1.0 s", r) for r in reasons)
    assert [line for line in stderr_lines(server) if line.get("event") == "nats_disconnected"] == []


def test_stream_that_does_not_take_the_subject(start_server, nats_server):
    """An existing stream whose subjects miss NATS_SUBJECT is used as it is: no event is taken (503), /readyz and
    stderr say why; once its subjects cover the subject, batches are taken without a restart."""
    put_stream([nats_server.url], STREAM, ["other.>"])
    server = start_server(workers=1, env=nats_env(nats_server))
    reason = f"stream {STREAM} does not take subject {SUBJECT} (its subjects: other.>)"
    wait_for(lambda: get(server, "/readyz") == (503, {"error": "Not ready", "reason": reason}), 30, "no reason")
    status, headers, body = post(server, [{"type": "refused", "id": "refused-1"}])
    assert ((status, body), headers.get("Retry-After")) == (UNAVAILABLE, "5")
    assert stream_info([nats_server.url], STREAM).state.messages == 0

    put_stream([nats_server.url], STREAM, ["other.>", SUBJECT])
    wait_for(lambda: get(server, "/readyz")[0] == 200, 30, "the corrected stream was not taken")
    status, _, body = post(server, [{"type": "taken", "id": "taken-1"}])
    assert (status, body) == (200, {"success": True, "received": 1})
    assert server.stop() == 0
    unusable = [line for line in stderr_lines(server) if line.get("event") == "nats_stream_unusable"]
    assert [(line["level"], line["reason"]) for line in unusable] == [("error", reason)]


def test_an_event_the_stream_refuses_and_a_deleted_stream_are_503s_then_taken(start_server, nats_server):
    """JetStream's refusal of one event (larger than the stream's max_msg_size) makes its batch a 503 whose reason
    stderr gives; a stream deleted under the service gets no answer for a publish (no responders): a 503, after
    which the sink makes the stream again, and batches are taken without a restart."""
    put_stream([nats_server.url], STREAM, [SUBJECT], max_msg_size=400)
    server = start_server(workers=1, env=nats_env(nats_server))
    wait_for(lambda: get(server, "/readyz")[0] == 200, 30, "not ready")
    small, large = {"type": "small", "id": "small-1"}, {"type": "large", "id": "large-1", "payload": {"t": "x" * 500}}
    status, headers, body = post(server, [small, large])
    assert ((status, body), headers.get("Retry-After")) == (UNAVAILABLE, "5")
    # The retry without the event the stream cannot hold is taken; the one stored already is not stored twice.
    assert post(server, [small])[::2] == (200, {"success": True, "received": 1})
    assert [json.loads(message.data)["id"] for message in read_stream([nats_server.url], STREAM)] == ["small-1"]

    delete_stream([nats_server.url], STREAM)
    status, headers, body = post(server, [{"type": "lost", "id": "lost-1"}])
    assert ((status, body), headers.get("Retry-After")) == (UNAVAILABLE, "5")
    again = {"type": "again", "id": "again-1"}
    wait_for(lambda: post(server, [again])[0] == 200, 30, "the stream was not made again")
    info = stream_info([nats_server.url], STREAM)
    assert (info.config.subjects, info.config.max_msg_size) == ([SUBJECT], -1)
    assert [json.loads(message.data)["id"] for message in read_stream([nats_server.url], STREAM)] == ["again-1"]
    assert server.stop() == 0
    reasons = [line["reason"] for line in stderr_lines(server) if line.get("event") == "event_store_unavailable"]
    assert reasons[0] == (
        "JetStream refused 1 of 2 events: nats: BadRequestError: code=400 err_code=10054 "
        "description='message size exceeds maximum allowed'"
    ), reasons
    assert reasons[1] == "JetStream refused 1 of 1 events: nats: no response from stream", reasons


def test_an_event_larger_than_the_server_takes_is_a_503_before_anything_is_sent(start_server, tmp_path):
    """A message over the server's max_payload would cost the connection (the server closes it): the sink refuses
    the batch before sending any of it, and the next batch is taken on the same connection."""
    with running_server(tmp_path, max_payload=2048) as nats_server:
        server = start_server(workers=1, env=nats_env(nats_server))
        wait_for(lambda: get(server, "/readyz")[0] == 200, 30, "not ready")
        large = {"type": "large", "id": "large-1", "payload": {"t": "x" * 3000}}
        status, headers, body = post(server, [{"type": "small", "id": "small-1"}, large])
        assert ((status, body), headers.get("Retry-After")) == (UNAVAILABLE, "5")
        assert post(server, [{"type": "small", "id": "small-2"}])[::2] == (200, {"success": True, "received": 1})
        assert [json.loads(message.data)["id"] for message in read_stream([nats_server.url], STREAM)] == ["small-2"]
        assert server.stop() == 0
    (reason,) = [line["reason"] for line in stderr_lines(server) if line.get("event") == "event_store_unavailable"]
    assert re.fullmatch(r"an event of \d{4} bytes is more than the NATS server takes \(2048\)", reason), reason
    assert [line for line in stderr_lines(server) if line.get("event") == "nats_disconnected"] == []


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        (
            "ANALYTICS_SINKS",
            "stdout,redis",
            "SINKS must be one or more of stdout, nats, kafka, each once, not ['stdout', 'redis']",
        ),
        ("ANALYTICS_NATS_SERVERS", "nats://127.0.0.1:4222,127.0.0.1:4223", "NATS_SERVERS: '127.0.0.1:4223' is not"),
        ("ANALYTICS_NATS_STREAM", "analytics.events", "NATS_STREAM must be a stream name"),
        ("ANALYTICS_NATS_SUBJECT", "analytics.*", "NATS_SUBJECT must be a subject"),
        ("ANALYTICS_NATS_REPLICAS", "7", "NATS_REPLICAS must be an integer from 1 to 5"),
        ("ANALYTICS_NATS_ACK_TIMEOUT", "0", "NATS_ACK_TIMEOUT must be a number of seconds from 0.001 to 86400, not 0"),
        ("ANALYTICS_NATS_DUPLICATE_WINDOW", "two minutes", "NATS_DUPLICATE_WINDOW must be a number of seconds"),
    ],
)
def test_bad_nats_setting_stops_gunicorn_with_one_line(variable, value, named):
    """A bad SINKS or NATS_* setting is one line on stderr naming it, and a non-zero exit, before any worker."""
    assert named in refusal(run_gunicorn({"ANALYTICS_SINKS": "nats", variable: value}))


def test_sigterm_under_load_loses_nothing_acknowledged(start_server, nats_server):
    """SIGTERM to the master mid-load with the nats sink: every 200's events are in the stream exactly once, a
    batch cut off is stored whole or not at all only if it was never acknowledged, and workers close cleanly."""
    server = start_server(workers=4, env=nats_env(nats_server))
    outcomes = run_load(
        server.port, make_batches(600, tag="nt"), after=(200, lambda: server.process.send_signal(signal.SIGTERM))
    )
    assert server.process.wait(60) == 0
    server.stop()

    answered = [outcome for outcome in outcomes if outcome.error is None]
    assert len(answered) >= 200 and len(answered) < len(outcomes), "SIGTERM did not land in the middle of the load"
    assert [summarize(o) for o in answered if o.status == 200 and summarize(o) != expected_answer(o.batch)] == []
    assert [summarize(o) for o in answered if o.status not in (200, 503)] == []
    stored = Counter(json.loads(message.data)["id"] for message in read_stream([nats_server.url], STREAM))
    acknowledged = {event_id for o in answered if o.status == 200 for event_id in o.batch.accepted}
    assert acknowledged - stored.keys() == set(), "acknowledged events missing from the stream"
    assert [event_id for event_id, times in stored.items() if times > 1] == []
    assert [
        line for line in stderr_lines(server) if line.get("event") in ("nats_close_failed", "nats_sink_stopped")
    ] == []
