"""The Kafka sink against a real Kafka-protocol broker (Tansu) and real gunicorn: what the topic holds, byte for
byte, keys and id headers, the broker away at start, cut off mid-load and restarted without its data, a producer
the broker fenced or whose id it gave away, bad settings (secrets never echoed), SIGTERM under load."""

import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import pytest
from confluent_kafka import Producer

from analytics.eventlog import Batch, SinkUnavailableError
from analytics.kafka import REPORT_SLACK, KafkaSink, record_key
from app import create_app
from tests.harness.clients import send
from tests.harness.engines import UNAVAILABLE, get, post, stderr_lines, stdout_lines, wait_for
from tests.harness.gunicorn import Server, refusal, run_gunicorn
from tests.harness.kafka import KafkaBroker, create_topic, read_topic, running_broker
from tests.harness.load import expected_answer, make_batches, run_load, summarize

TOPIC = "analytics-events"
# The ack timeout of the outage tests: short, so that they last seconds.
ACK_TIMEOUT = 1.0
# Beyond the ack timeout and the sink's slack, what an answer may take on a busy machine (scheduling). Far
# below librdkafka's own five minutes and gunicorn's 30 s timeout, so a request stuck on the broker would show.
LATENCY_SLACK = 3.0


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[KafkaBroker]:
    """A real Kafka-protocol broker, stopped after the test."""
    with running_broker(tmp_path) as started:
        yield started


def kafka_env(broker: KafkaBroker, sinks: str = "kafka", **settings: str) -> dict[str, str]:
    """The environment of a gunicorn whose sinks are ``sinks``, the Kafka one on ``broker``."""
    env = {"ANALYTICS_SINKS": sinks, "ANALYTICS_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap}
    env.update({f"ANALYTICS_{name}": value for name, value in settings.items()})
    return env


def test_record_key_is_the_user_else_the_session_else_none():
    """Per-user order within a partition: the key is userId, else sessionId, else no key."""
    assert record_key({"userId": "u-1", "sessionId": "s-1"}) == b"u-1"
    assert record_key({"userId": None, "sessionId": "s-1"}) == b"s-1"
    assert record_key({"sessionId": "s-é"}) == "s-é".encode()
    assert record_key({"type": "anonymous"}) is None


def test_building_the_app_starts_nothing_until_first_use(broker):
    """create_app (which gunicorn's master runs before forking) starts no thread, Python's or librdkafka's; the
    first use in a process creates the producer and its serving thread and waits (bounded) until it is connected;
    close flushes it and ends every thread."""
    before = set(threading.enumerate())
    tasks = len(os.listdir("/proc/self/task"))
    app = create_app({"TESTING": True, "SINKS": ["kafka"], "KAFKA_BOOTSTRAP_SERVERS": [broker.bootstrap]})
    assert (set(threading.enumerate()), len(os.listdir("/proc/self/task"))) == (before, tasks)
    sink = app.extensions["kafka"]
    try:
        assert sink.unready_reason() is None
        assert [thread.name for thread in set(threading.enumerate()) - before] == ["kafka-sink"]
        assert len(os.listdir("/proc/self/task")) > tasks + 1
    finally:
        sink.close()
    # librdkafka's own threads end as the producer is destroyed, the last a moment after close returns.
    wait_for(lambda: len(os.listdir("/proc/self/task")) == tasks, 10, "librdkafka's threads ended")
    assert set(threading.enumerate()) == before


def test_a_producer_librdkafka_refuses_is_unready_and_says_why(broker):
    """Settings valid one by one but not together are found when the producer is created: no crash, a 503 and
    /readyz's reason from librdkafka, with the secrets of KAFKA_CONFIG taken out of it."""
    secret = "hunter2-s3cret"
    client_config = {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": secret, "sasl.password": secret}
    app = create_app(
        {
            "TESTING": True,
            "SINKS": ["kafka"],
            "KAFKA_BOOTSTRAP_SERVERS": [broker.bootstrap],
            "KAFKA_CONFIG": client_config,
        }
    )
    sink = app.extensions["kafka"]
    try:
        client = app.test_client()
        response = client.get("/readyz")
        reason = "the Kafka producer could not be created: Failed to create producer: Unsupported SASL mechanism: "
        assert (response.status_code, response.json) == (503, {"error": "Not ready", "reason": f"{reason}[REDACTED]"})
        response = client.post("/api/analytics", json={"events": [{"type": "refused"}]})
        assert (response.status_code, response.json, response.headers["Retry-After"]) == (*UNAVAILABLE, "5")
    finally:
        sink.close()


def test_stdout_and_kafka_sinks_agree_byte_for_byte(start_server, broker):
    """With both sinks every accepted event is one record whose value is exactly its stdout line, keyed by userId,
    else sessionId, else none, with its id as the "id" header (none without an id). A batch of 1000 events is one
    request and 1000 records, each user's events in one partition in the order sent."""
    create_topic(broker.bootstrap, TOPIC, partitions=3)
    server = start_server(workers=2, env=kafka_env(broker, sinks="stdout,kafka"))
    thousand = [
        {"type": "page_view", "id": f"k-{n}", "userId": f"user-{n % 7}", "payload": {"n": n}} for n in range(1000)
    ]
    batches = [
        [{"type": "session_only", "id": "k-session", "sessionId": "session-1"}, {"type": "no_key", "id": "k-none"}],
        [{"type": "no_id", "userId": "user-1", "payload": {"text": "line\u2028separator, é, \U0001f600"}}],
        [{"type": "big", "id": "k-big", "payload": {"blob": "b" * 30_000}}, {"type": "plain"}],
    ]
    status, headers, body = post(server, thousand)
    assert (status, body) == (200, {"success": True, "received": 1000})
    thousand_request = headers["X-Request-ID"]
    for events in batches:
        status, _, body = post(server, events)
        assert (status, body) == (200, {"success": True, "received": len(events)})
    assert server.stop() == 0

    lines = stdout_lines(server)
    records = read_topic(broker.bootstrap, TOPIC)
    assert len(lines) == 1000 + sum(len(events) for events in batches)
    assert Counter(record.value for record in records) == Counter(lines)
    for record in records:
        event = json.loads(record.value)
        assert record.key == record_key(event)
        assert record.header("id") == (event["id"].encode() if "id" in event else None)
        assert [name for name, _ in record.headers] == (["id"] if "id" in event else [])
    keys = {json.loads(record.value).get("id"): record.key for record in records}
    assert (keys["k-session"], keys["k-none"], keys["k-big"]) == (b"session-1", None, None)

    batch = [record for record in records if json.loads(record.value)["request_id"] == thousand_request]
    assert len(batch) == 1000
    for user in range(7):
        mine = [record for record in batch if record.key == f"user-{user}".encode()]
        assert len({record.partition for record in mine}) == 1
        ordered = sorted(mine, key=lambda record: record.offset)
        assert [json.loads(record.value)["payload"]["n"] for record in ordered] == list(range(user, 1000, 7))
    trouble = ("kafka_producer_refused", "kafka_producer_replaced", "kafka_close_unflushed")
    assert [line for line in stderr_lines(server) if line.get("event") in trouble] == []


def test_kafka_alone_writes_nothing_to_stdout_and_a_retry_is_stored_again(start_server, broker):
    """Without stdout in SINKS no event line reaches stdout or stderr. Kafka keeps no ids: a batch sent twice is
    stored twice, and the id header is how a consumer drops the copy (as docs/kafka.md says)."""
    server = start_server(workers=2, env=kafka_env(broker))
    events = [{"type": "retry", "id": f"retry-{n}", "userId": "u"} for n in range(20)]
    for _ in range(2):
        status, _, body = post(server, events)
        assert (status, body) == (200, {"success": True, "received": len(events)})
    assert server.stop() == 0

    stored = Counter(record.header("id") for record in read_topic(broker.bootstrap, TOPIC))
    assert stored == {event["id"].encode(): 2 for event in events}
    assert bytes(server.stdout) == b""
    assert [line for line in stderr_lines(server) if line.get("kind") == "event"] == []


def test_broker_down_at_start(start_server, tmp_path):
    """With no broker the workers boot all the same; batches get 503 with Retry-After and /readyz says why; once
    the broker is up batches are taken."""
    broker = KafkaBroker(tmp_path)
    server = start_server(workers=1, env=kafka_env(broker))
    status, headers, body = post(server, [{"type": "early", "id": "early-1"}])
    assert ((status, body), headers.get("Retry-After")) == (UNAVAILABLE, "5")
    assert get(server, "/readyz") == (
        503,
        {"error": "Not ready", "reason": f"Kafka not connected (connecting to {broker.bootstrap})"},
    )
    assert get(server, "/healthz") == (200, {"status": "ok"})

    broker.start()
    try:
        wait_for(lambda: get(server, "/readyz")[0] == 200, 30, "the worker was not ready once Kafka was up")
        status, _, body = post(server, [{"type": "late", "id": "late-1"}])
        assert (status, body) == (200, {"success": True, "received": 1})
        assert [record.header("id") for record in read_topic(broker.bootstrap, TOPIC)] == [b"late-1"]
    finally:
        broker.stop()
    connected = [line for line in stderr_lines(server) if line.get("event") == "kafka_connected"]
    assert len(connected) == 1


class Answer(NamedTuple):
    """One answer a RetryingClient got, and when its request was sent and answered (time.monotonic)."""

    status: int
    retry_after: str | None
    body: Any
    sent: float
    answered: float


class RetryingClient(threading.Thread):
    """Posts batches of new events with ids, each retried on a 503 until it gets a 200, as analytics.js does."""

    def __init__(self, port: int, name: str, stop: threading.Event, deadline: float) -> None:
        super().__init__(daemon=True)
        self.port, self.tag, self.stop_sending, self.deadline = port, name, stop, deadline
        self.answers: list[Answer] = []
        self.sent: set[str] = set()
        # Every batch that got its 200: when the request that got it was sent, and the batch's ids.
        self.acknowledged: list[tuple[float, list[str]]] = []
        self.unfinished: list[str] = []

    def run(self) -> None:
        number = 0
        while not self.stop_sending.is_set() and time.monotonic() < self.deadline:
            events = [
                {"type": "load", "id": f"{self.tag}-{number}-{index}", "userId": f"{self.tag}-{index % 3}"}
                for index in range(1 + number % 7)
            ]
            self.sent.update(event["id"] for event in events)
            number += 1
            body = orjson.dumps({"events": events})
            while time.monotonic() < self.deadline:
                sent = time.monotonic()
                status, headers, answer = send(self.port, body)
                self.answers.append(Answer(status, headers.get("Retry-After"), answer, sent, time.monotonic()))
                if status == 200:
                    self.acknowledged.append((sent, [event["id"] for event in events]))
                    break
                # Not Retry-After's 5 s: the test would last minutes.
                time.sleep(0.05)
            else:
                self.unfinished.extend(event["id"] for event in events)

    def count(self, status: int) -> int:
        return sum(answer.status == status for answer in self.answers)


def acknowledged_ids(clients: list[RetryingClient], sent_after: float = float("-inf")) -> set[str]:
    """The ids of every batch answered 200 whose request was sent after ``sent_after`` (time.monotonic)."""
    return {
        event_id for client in clients for sent, ids in client.acknowledged if sent > sent_after for event_id in ids
    }


# The bounds of run_outage's waits: generous, for a busy machine; none is reached when things work.
TAKE_WAIT, AWAY_WAIT, RECOVERY_WAIT = 60, 60, 150
# Answers in a row, over all clients, that must be 200s for the service to count as recovered: a worker still
# stuck would answer some of them (its 503s are quick, so it is free to take requests more often than not).
RECOVERED_RUN = 40


def recovered(clients: list[RetryingClient], since: float) -> bool:
    """Whether 100 batches sent after ``since`` got their 200s, and the last RECOVERED_RUN answers are 200s."""
    answers = sorted((answer for client in clients for answer in list(client.answers)), key=lambda a: a.answered)
    taken = sum(answer.status == 200 and answer.sent > since for answer in answers)
    return taken >= 100 and all(answer.status == 200 for answer in answers[-RECOVERED_RUN:])


def run_outage(
    server: Server, away: Callable[[], None], back: Callable[[], None]
) -> tuple[list[RetryingClient], Any, float, float]:
    """Four retrying clients; ``away`` once 100 batches are taken, ``back`` once 20 got a 503, then load until the
    service has recovered (``recovered``). The clients, what /readyz said while the broker was away, and when
    (time.monotonic) ``away`` and ``back`` returned."""
    stop = threading.Event()
    deadline = time.monotonic() + TAKE_WAIT + AWAY_WAIT + RECOVERY_WAIT + 30
    clients = [RetryingClient(server.port, f"c{n}", stop, deadline) for n in range(4)]
    for client in clients:
        client.start()
    try:
        wait_for(lambda: sum(c.count(200) for c in clients) >= 100, TAKE_WAIT, "100 batches were not taken")
        away()
        gone = time.monotonic()
        wait_for(lambda: sum(c.count(503) for c in clients) >= 20, AWAY_WAIT, "no 503s while Kafka was away")
        readyz_away = get(server, "/readyz")
        back()
        returned = time.monotonic()
        wait_for(lambda: recovered(clients, returned), RECOVERY_WAIT, "no recovery")
    finally:
        stop.set()
        for client in clients:
            client.join(60)
    return clients, readyz_away, gone, returned


def check_answers(clients: list[RetryingClient]) -> None:
    """Only 200s and 503s with Retry-After, none slower than the ack timeout allows, every batch finished."""
    answers = [answer for client in clients for answer in client.answers]
    assert {answer.status for answer in answers} == {200, 503}
    assert [
        answer.body for answer in answers if answer.status != 200 and (answer.status, answer.body) != UNAVAILABLE
    ] == []
    assert {answer.retry_after for answer in answers if answer.status == 503} == {"5"}
    slowest = max(answer.answered - answer.sent for answer in answers)
    assert slowest < ACK_TIMEOUT + REPORT_SLACK + LATENCY_SLACK, f"an answer took {slowest:.1f} s"
    assert [event_id for client in clients for event_id in client.unfinished] == []


def test_broker_away_mid_load_recovers_and_loses_nothing(start_server, tmp_path):
    """The broker cut off under load (every connection reset, new ones refused, as a stopped broker) and back:
    meanwhile only 503s with Retry-After, none slower than the ack timeout allows, /readyz failing; then every
    worker takes batches again (a producer the broker fenced for records in flight during the cut is replaced);
    every event of every 200 is in the topic, and nothing that was never sent."""
    with running_broker(tmp_path, proxied=True) as broker:
        proxy = broker.proxy
        assert proxy
        server = start_server(workers=4, env=kafka_env(broker, KAFKA_ACK_TIMEOUT=str(ACK_TIMEOUT)))
        clients, readyz_away, _, _ = run_outage(server, proxy.cut, proxy.restore)
        stored = Counter(record.header("id").decode() for record in read_topic(broker.bootstrap, TOPIC))

    assert readyz_away == (
        503,
        {"error": "Not ready", "reason": f"Kafka not connected (connecting to {broker.bootstrap})"},
    )
    check_answers(clients)
    assert acknowledged_ids(clients) - stored.keys() == set(), "acknowledged events missing from the topic"
    assert stored.keys() - {event_id for client in clients for event_id in client.sent} == set()


def test_broker_restarted_without_its_data_recovers(start_server, broker):
    """The broker killed under load and started again empty (Tansu keeps everything in memory: a broker that lost
    its disk, its topics and producer ids with it): 503s with Retry-After meanwhile, then the stuck producers are
    replaced and every worker takes batches again. Every event of a 200 whose request was sent once the old broker
    was dead is in the new topic. A batch sent before, even if answered after, may have been stored by the old
    broker, which lost it: the broker's loss, which only a broker keeping its data avoids (docs/kafka.md)."""
    server = start_server(workers=4, env=kafka_env(broker, KAFKA_ACK_TIMEOUT=str(ACK_TIMEOUT)))
    clients, _, killed, _ = run_outage(server, broker.kill, broker.start)
    stored = {record.header("id").decode() for record in read_topic(broker.bootstrap, TOPIC)}
    assert server.stop() == 0

    check_answers(clients)
    after_kill = acknowledged_ids(clients, sent_after=killed)
    assert after_kill and after_kill - stored == set(), "events acknowledged after the broker's restart are missing"
    replaced = [line["reason"] for line in stderr_lines(server) if line.get("event") == "kafka_producer_replaced"]
    assert replaced, "no producer was replaced"


def stale_batch(*ids: str) -> Batch:
    """A batch of one event per id, all keyed "u" (one partition), as the ingestor hands it to the sinks."""
    events = [{"type": "stale", "id": event_id, "userId": "u"} for event_id in ids]
    return Batch(events, b"".join(orjson.dumps(event) + b"\n" for event in events))


def write_until_taken(sink: KafkaSink, event_id: str, refusals: list[str]) -> Callable[[], bool]:
    """A condition for wait_for: write a batch of ``event_id``, True once taken; each refusal's reason kept."""

    def taken() -> bool:
        try:
            sink.write(stale_batch(event_id))
        except SinkUnavailableError as error:
            refusals.append(str(error))
            return False
        return True

    return taken


def test_a_producer_the_broker_fenced_after_a_cut_is_replaced(tmp_path):
    """A batch whose record is in flight when the broker stops answering times out (503); the connection is then
    cut and the broker is back. Tansu then fences the producer (PRODUCER_FENCED for every later record, for ever):
    the producer is replaced at the first such refusal, and a batch is taken again."""
    with running_broker(tmp_path, proxied=True) as broker:
        proxy = broker.proxy
        assert proxy
        create_topic(broker.bootstrap, TOPIC, partitions=1)
        sink = KafkaSink([broker.bootstrap], TOPIC, {}, ack_timeout=ACK_TIMEOUT)
        refusals: list[str] = []
        try:
            sink.write(stale_batch("before"))
            proxy.hold()
            # Refused once its record timed out, or (on a busy machine) once its report was late.
            with pytest.raises(SinkUnavailableError):
                sink.write(stale_batch("in-flight"))
            proxy.cut()
            proxy.restore()
            wait_for(write_until_taken(sink, "after", refusals), 60, "no batch was taken after the cut")
        finally:
            sink.close()
        stored = [record.header("id") for record in read_topic(broker.bootstrap, TOPIC)]
    fenced = "Kafka did not take 1 of 1 records: Broker: There is a newer producer with the same transactionalId"
    assert any(refusal.startswith(fenced) for refusal in refusals), refusals
    assert stored[0] == b"before" and stored[-1] == b"after" and set(stored) <= {b"before", b"in-flight", b"after"}


def test_a_broker_that_gave_the_producer_id_to_another_producer_is_not_believed(broker):
    """A broker restarted empty hands out producer ids from the start again: a new producer gets the id a worker's
    producer still uses, and the broker then answers that worker's new records with "duplicate sequence", which
    librdkafka reports as delivered, without an offset. Those records are not stored: the batch gets a 503, the
    producer is replaced, and the next batch is stored."""
    create_topic(broker.bootstrap, TOPIC, partitions=1)
    sink = KafkaSink([broker.bootstrap], TOPIC, {}, ack_timeout=5.0)
    refusals: list[str] = []
    try:
        sink.write(stale_batch("old-0", "old-1", "old-2"))  # the sink's producer id, sequence numbers 0 to 2
        broker.kill()
        broker.start()
        create_topic(broker.bootstrap, TOPIC, partitions=1)
        other = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True, "linger.ms": 0})
        for number in range(10):  # the first producer id the new broker gives, sequence numbers 0 to 9
            other.produce(TOPIC, b"{}", b"u", headers=[("id", f"other-{number}".encode())])
        assert other.flush(30) == 0
        del other
        wait_for(lambda: sink.unready_reason() is None, 60, "the sink did not reconnect")

        with pytest.raises(SinkUnavailableError) as refused:
            sink.write(stale_batch("new-3"))  # sequence number 3, which the other producer's id has had
        assert str(refused.value) == "Kafka answered that it already had records, without saying where it has them"
        wait_for(write_until_taken(sink, "new-4", refusals), 60, "no batch was taken after the producer was replaced")
    finally:
        sink.close()
    stored = [record.header("id") for record in read_topic(broker.bootstrap, TOPIC)]
    assert sorted(stored) == sorted([f"other-{number}".encode() for number in range(10)] + [b"new-4"])


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("ANALYTICS_SINKS", "kafka,kafka", "SINKS must be one or more of stdout, nats, kafka, each once"),
        ("ANALYTICS_KAFKA_BOOTSTRAP_SERVERS", "kafka://127.0.0.1:9092", "KAFKA_BOOTSTRAP_SERVERS: 'kafka://127.0.0.1"),
        ("ANALYTICS_KAFKA_BOOTSTRAP_SERVERS", "[]", "KAFKA_BOOTSTRAP_SERVERS must name at least one broker"),
        ("ANALYTICS_KAFKA_TOPIC", "analytics/events", "KAFKA_TOPIC must be a topic name"),
        (
            "ANALYTICS_KAFKA_ACK_TIMEOUT",
            "0",
            "KAFKA_ACK_TIMEOUT must be a number of seconds from 0.001 to 86400, not 0",
        ),
        ("ANALYTICS_KAFKA_CONFIG", "security.protocol=SSL", "KAFKA_CONFIG must be a JSON object"),
        ("ANALYTICS_KAFKA_CONFIG", '{"acks": "1"}', "KAFKA_CONFIG may not set 'acks': the service sets it"),
        ("ANALYTICS_KAFKA_CONFIG", '{"enable.idempotence": false}', "KAFKA_CONFIG may not set 'enable.idempotence'"),
        ("ANALYTICS_KAFKA_CONFIG", '{"message.timeout.ms": 300000}', "KAFKA_CONFIG may not set 'message.timeout.ms'"),
        ("ANALYTICS_KAFKA_CONFIG", '{"linger.ms": [1]}', "KAFKA_CONFIG: 'linger.ms' must be a string, a number"),
        ("ANALYTICS_KAFKA_CONFIG", '{"linger.msec": 1}', 'KAFKA_CONFIG: No such configuration property: "linger.msec"'),
        (
            "ANALYTICS_KAFKA_CONFIG",
            '{"sasl.password": "hunter2-s3cret", "security.protocol": "hunter2-s3cret"}',
            'KAFKA_CONFIG: Invalid value "[REDACTED]" for configuration property "security.protocol"',
        ),
    ],
)
def test_bad_kafka_setting_stops_gunicorn_with_one_line(variable, value, named):
    """A bad SINKS or KAFKA_* setting is one line on stderr naming it, and a non-zero exit, before any worker;
    a secret of KAFKA_CONFIG is never written, even when librdkafka's refusal quotes it."""
    result = run_gunicorn({"ANALYTICS_SINKS": "kafka", variable: value})
    assert named in refusal(result)
    assert "hunter2" not in result.stderr + result.stdout


def test_sigterm_under_load_loses_nothing_acknowledged(start_server, broker):
    """SIGTERM to the master mid-load with the kafka sink: every 200's events are in the topic exactly once,
    and the workers flush and close cleanly."""
    server = start_server(workers=4, env=kafka_env(broker))
    outcomes = run_load(
        server.port, make_batches(600, tag="kt"), after=(200, lambda: server.process.send_signal(signal.SIGTERM))
    )
    assert server.process.wait(60) == 0
    server.stop()

    answered = [outcome for outcome in outcomes if outcome.error is None]
    assert len(answered) >= 200 and len(answered) < len(outcomes), "SIGTERM did not land in the middle of the load"
    assert [summarize(o) for o in answered if o.status == 200 and summarize(o) != expected_answer(o.batch)] == []
    assert [summarize(o) for o in answered if o.status not in (200, 503)] == []
    stored = Counter(record.header("id").decode() for record in read_topic(broker.bootstrap, TOPIC))
    acknowledged = {event_id for o in answered if o.status == 200 for event_id in o.batch.accepted}
    assert acknowledged - stored.keys() == set(), "acknowledged events missing from the topic"
    assert [event_id for event_id, times in stored.items() if times > 1] == []
    trouble = ("kafka_producer_replaced", "kafka_close_unflushed")
    assert [line for line in stderr_lines(server) if line.get("event") in trouble] == []
