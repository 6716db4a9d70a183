"""The Kafka sink: each accepted event one record on a topic, a batch taken only once every record is delivered.

Each event is one record on ``KAFKA_TOPIC``. Its value is the event's line as
the stdout sink writes it (without the newline); its key is the event's
``userId``, else its ``sessionId``, else none, so that one user's events keep
their order within a partition; its ``id``, when it has one, travels as the
``id`` header. ``write`` returns only once every record of the batch has a
successful delivery report (with ``acks=all``: stored by every in-sync
replica), and raises ``SinkUnavailableError`` otherwise, which the ingestor
answers with a 503 and Retry-After, as for JetStream.

The producer is librdkafka's (confluent-kafka), idempotent (``acks=all``,
``enable.idempotence=true``): its own retries within a batch add no copy and
keep the order. ``message.timeout.ms`` is ``KAFKA_ACK_TIMEOUT``, so that
librdkafka gives up on a record (a failed delivery report) by the time the
request is answered, instead of holding it for its default five minutes. A
record given up on while in flight may still have been stored, and one queued
when a batch fails may still be delivered: the client retries the batch, and
the event ids let a consumer drop the copies, as documented in docs/kafka.md.

How it runs. librdkafka's threads do not survive ``fork``, so nothing is
created in the gunicorn master (which builds the app once to check settings):
each worker creates its producer, and one thread that serves it (delivery
reports, errors, statistics), by gunicorn's ``post_worker_init`` hook, or else
on first use. Creating it does not wait for the broker: librdkafka connects in
the background and for ever, so a worker boots whether or not Kafka is up.
Readiness comes from librdkafka's statistics (every ``STATS_INTERVAL``): ready
once a broker is up and the idempotent producer has its producer id; a report
that all brokers are down makes it unready at once. A fatal error leaves an
idempotent producer unusable by design; one whose records the broker refuses
for its producer id or epoch (fenced, unknown), or that is connected but has
every record time out batch after batch, is stuck: each is replaced by a new
producer, which gets a new producer id.

A successful delivery report counts only with an offset. librdkafka reports a
broker's "duplicate sequence number" answer as a success without one: the
broker says it already has those records, under the producer id and sequence
numbers this producer sent. After a broker lost its state and gave this
producer's id to another producer, that answer is false (the records were
never stored), so a batch with such a report is answered 503 and the producer,
whose id the broker no longer knows as its own, is replaced.
"""

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson
import structlog
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from analytics.eventlog import Batch, SinkUnavailableError
from config import SettingsError

log = structlog.get_logger()

# Defaults KAFKA_CONFIG may change. linger.ms 0: a batch's records are produced together, so waiting for more
# (librdkafka's 5 ms) only delays the answer; measured against 1 ms, 0 took 0.2 ms a write instead of 1.7 ms at
# one event, and about the same at 10 and 100. murmur2_random: the partition of a key as Java clients choose it.
# log_level 2: librdkafka logs every failed try to connect, twice a second during an outage; the same failures
# reach error_cb, which logs each once until the producer is ready again.
DEFAULTS = {"linger.ms": 0, "partitioner": "murmur2_random", "log_level": 2}
# Words in a setting's name that make its value a secret, never written to a log or an error.
SECRET_WORDS = ("password", "secret", "token", "key", "credential", "jaas")
# A property no librdkafka has: set last, so that checking KAFKA_CONFIG stops there, before a client exists.
CHECK_SENTINEL = "analytics.config.check.end"

# The elapsed time librdkafka puts in an error's text.
ELAPSED = re.compile(r" \(after \d+ms[^)]*\)")
# Milliseconds between librdkafka's statistics, which say whether a broker is up (readiness).
STATS_INTERVAL_MS = 500
# How long one poll of the producer may block: the serving thread notices close() within this.
POLL_TIMEOUT = 0.2
# Beyond KAFKA_ACK_TIMEOUT, for librdkafka to report a record it gave up on (its timeout scan runs every 100 ms).
REPORT_SLACK = 1.0
# How long a first use waits for the producer's first connection (or a failure to connect).
FIRST_TRY_WAIT = 2.0
# Batches in a row whose records all timed out while the producer was connected: then it is replaced (below).
STALLED_BATCHES = 3
# Seconds between two such replacements, so that a broker refusing everything does not have producers churn.
REPLACE_INTERVAL = 10.0
# A broker's refusals of the producer's id or epoch: the producer is replaced at the first (see _note_failure).
PRODUCER_ID_REFUSALS = frozenset(
    {
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError.UNKNOWN_PRODUCER_ID,
        KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
        KafkaError.INVALID_PRODUCER_ID_MAPPING,
    }
)
# Flushing a worker's producer at exit.
CLOSE_TIMEOUT = 5.0


def is_secret(name: str) -> bool:
    """Whether the librdkafka property ``name`` holds a secret (sasl.password, ssl.key.password, ...)."""
    return any(word in name.lower() for word in SECRET_WORDS)


def scrub(text: str, client_config: Mapping[str, Any]) -> str:
    """``text`` with the value of every secret property of ``client_config`` replaced by "[REDACTED]"."""
    for name, value in client_config.items():
        if is_secret(name) and str(value):
            text = text.replace(str(value), "[REDACTED]")
    return text


def check_client_config(client_config: Mapping[str, Any]) -> None:
    """Have librdkafka check every property of KAFKA_CONFIG (name, and value), without creating a client.

    confluent-kafka applies the properties one by one, in order, before it
    creates the client, and raises at the first it refuses: with a property no
    librdkafka knows set last, reaching it means every other one was taken, and
    no thread or connection was made (this runs in the gunicorn master).
    Properties that are valid alone but not together are found when a worker
    creates its producer, which then logs why and answers 503.
    """
    try:
        Producer({**client_config, CHECK_SENTINEL: "1"})
    except KafkaException as error:
        message = error.args[0].str()
        if CHECK_SENTINEL not in message:
            raise SettingsError(f"KAFKA_CONFIG: {scrub(message, client_config)}") from None
    else:  # pragma: no cover - a librdkafka that took the sentinel would have created a client
        raise AssertionError("librdkafka accepted an unknown property")


def record_key(event: Mapping[str, Any]) -> bytes | None:
    """The record's key: the event's userId, else its sessionId (UTF-8), else none."""
    key = event.get("userId") or event.get("sessionId")
    return key.encode() if key else None


class _Deliveries:
    """The delivery reports one batch waits for: ``done`` is set once every record has one."""

    __slots__ = ("expected", "received", "failures", "done", "lock", "on_unconfirmed")

    def __init__(self, expected: int, on_unconfirmed: Callable[[], None]) -> None:
        self.expected = expected
        self.received = 0
        self.failures: list[KafkaError] = []
        self.done = threading.Event()
        self.lock = threading.Lock()
        # Called for a success without an offset (see the module's docstring).
        self.on_unconfirmed = on_unconfirmed

    def report(self, error: KafkaError | None, message: Message) -> None:
        """librdkafka's delivery report for one record (in the serving thread)."""
        with self.lock:
            self.received += 1
            if error is not None:
                self.failures.append(error)
            elif message.offset() is None:
                self.on_unconfirmed()
            if self.received == self.expected:
                self.done.set()


class KafkaSink:
    """Event lines as records on a Kafka topic; ``write`` returns once every record has been delivered."""

    name = "kafka"

    def __init__(
        self, bootstrap_servers: Sequence[str], topic: str, client_config: Mapping[str, Any], ack_timeout: float
    ) -> None:
        self.bootstrap_servers = list(bootstrap_servers)
        self.topic = topic
        self.client_config = dict(client_config)
        self.ack_timeout = ack_timeout
        self._start_lock = threading.Lock()
        self._pid: int | None = None
        self._producer: Producer | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._log = log
        self._problem: str | None = "not started"
        # Set once the producer is connected with its producer id, or has reported a failure to connect.
        self._first_try = threading.Event()
        # Why the producer must be replaced (a fatal error, a stall), for the serving thread to do it.
        self._replace_reason: str | None = None
        # Batches in a row that timed out while connected, and when the producer was last replaced for that.
        self._stalled = 0
        self._last_replaced = -REPLACE_INTERVAL
        # Connection errors logged since the producer was last ready: a long outage is a line per error, not per try.
        self._logged_errors: set[str] = set()
        # Successful delivery reports without an offset so far: a batch that saw this change is not answered 200.
        self._unconfirmed = 0

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "KafkaSink":
        """The sink the KAFKA_* settings describe; KAFKA_CONFIG checked by librdkafka (SettingsError)."""
        check_client_config(config["KAFKA_CONFIG"])
        return cls(
            bootstrap_servers=config["KAFKA_BOOTSTRAP_SERVERS"],
            topic=config["KAFKA_TOPIC"],
            client_config=config["KAFKA_CONFIG"],
            ack_timeout=config["KAFKA_ACK_TIMEOUT"],
        )

    def producer_config(self) -> dict[str, Any]:
        """The producer's librdkafka settings: the defaults, KAFKA_CONFIG, then the ones the service decides."""
        return {
            **DEFAULTS,
            "client.id": f"analytics-{os.getpid()}",
            **self.client_config,
            "bootstrap.servers": ",".join(self.bootstrap_servers),
            "acks": "all",
            "enable.idempotence": True,
            "message.timeout.ms": max(1, round(self.ack_timeout * 1000)),
            "statistics.interval.ms": STATS_INTERVAL_MS,
            "stats_cb": self._on_stats,
            "error_cb": self._on_error,
            # librdkafka's own log lines, as JSON on stderr like every other (served by poll, in the serving thread).
            "logger": logging.getLogger("librdkafka"),
        }

    # In the caller's thread.

    def start(self) -> None:
        """Create this process's producer and the thread serving it; once per process (a forked child starts its own).

        Never waits for the broker, and never raises: a producer librdkafka refuses leaves the sink unready, saying why.
        """
        with self._start_lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._log = log.bind(worker=self._pid)
            self._stop = threading.Event()
            self._first_try = threading.Event()
            self._replace_reason = None
            self._stalled = 0
            self._producer = self._new_producer()
            self._thread = threading.Thread(target=self._serve, name="kafka-sink", daemon=True)
            self._thread.start()

    def unready_reason(self) -> str | None:
        self.start()
        # A worker just started would otherwise turn its first requests away while connecting, which takes
        # well under a second; the wait is bounded, and over as soon as a try fails (a refused connection at once).
        self._first_try.wait(FIRST_TRY_WAIT)
        return self._problem

    def write(self, batch: Batch) -> None:
        reason = self.unready_reason()
        if reason:
            raise SinkUnavailableError(reason)
        producer = self._producer
        assert producer is not None
        deliveries = _Deliveries(len(batch.lines), self._on_unconfirmed)
        report = deliveries.report
        # Counted sink-wide, not per batch: librdkafka gives the records of a message set the broker called a
        # duplicate the offsets -1, 0, 1, ..., so only its first record has none, and that record may be a
        # previous batch's (one that timed out) sent in one request with this batch's.
        unconfirmed = self._unconfirmed
        topic = self.topic
        try:
            for event, line in zip(batch.events, batch.lines, strict=True):
                event_id = event.get("id")
                producer.produce(
                    topic,
                    line,
                    record_key(event),
                    headers=[("id", event_id.encode())] if event_id else None,
                    on_delivery=report,
                )
        except BufferError:
            raise SinkUnavailableError("the Kafka producer's queue is full") from None
        except KafkaException as error:
            raise SinkUnavailableError(f"Kafka refused a record: {error.args[0].str()}") from None
        if not deliveries.done.wait(self.ack_timeout + REPORT_SLACK):
            raise SinkUnavailableError(
                f"{deliveries.expected - deliveries.received} of {deliveries.expected} Kafka delivery reports did not "
                f"arrive within {self.ack_timeout + REPORT_SLACK} s"
            )
        if deliveries.failures:
            self._note_failure(deliveries.failures)
            raise SinkUnavailableError(
                f"Kafka did not take {len(deliveries.failures)} of {deliveries.expected} records: "
                f"{deliveries.failures[0].str()}"
            )
        if self._unconfirmed != unconfirmed:
            raise SinkUnavailableError("Kafka answered that it already had records, without saying where it has them")
        self._stalled = 0

    def _note_failure(self, failures: list[KafkaError]) -> None:
        """Have the producer replaced when the broker no longer takes its producer id, or stalls it.

        Some refusals say the broker no longer takes this producer's id or epoch (PRODUCER_ID_REFUSALS): a
        broker that lost its state no longer knows the id; Tansu answers PRODUCER_FENCED to every later record
        of a producer some of whose records timed out in flight while its connection was cut. librdkafka retries
        none of them into success, so the producer is replaced at the first. A producer can also be connected
        and still never deliver, every record timing out: it is replaced once STALLED_BATCHES batches in a row
        did. A new producer asks the broker for a new id. Against a broker that refuses everything, replacing
        costs a reconnection every REPLACE_INTERVAL seconds at most.
        """
        codes = {failure.code() for failure in failures}
        refusals = codes & PRODUCER_ID_REFUSALS
        if refusals:
            self._stalled = 0
            self._request_replacement(f"Kafka refused the producer id ({KafkaError(min(refusals)).name()})")
            return
        if codes != {KafkaError._MSG_TIMED_OUT}:
            return
        self._stalled += 1
        if self._stalled >= STALLED_BATCHES and self._request_replacement(
            f"{STALLED_BATCHES} batches in a row timed out while connected"
        ):
            self._stalled = 0

    def _on_unconfirmed(self) -> None:
        """A record reported delivered without an offset (serving thread): fail its batch, replace the producer."""
        self._unconfirmed += 1
        self._request_replacement("Kafka called new records duplicates (a producer id it gave another producer)")

    def _request_replacement(self, reason: str) -> bool:
        """Have the serving thread replace the producer, unless it was replaced less than REPLACE_INTERVAL ago."""
        now = time.monotonic()
        if now - self._last_replaced <= REPLACE_INTERVAL:
            return False
        self._last_replaced = now
        self._replace_reason = self._replace_reason or reason
        return True

    def close(self) -> None:
        """Flush this process's producer (bounded by CLOSE_TIMEOUT) and stop the thread serving it."""
        with self._start_lock:
            if self._pid != os.getpid() or not self._thread:
                return
            thread, self._thread, self._pid = self._thread, None, None
        self._stop.set()
        thread.join(CLOSE_TIMEOUT)
        producer, self._producer = self._producer, None
        if producer is not None:
            left = producer.flush(CLOSE_TIMEOUT)
            if left:
                self._log.warning("kafka_close_unflushed", records=left)

    # In the serving thread (and, for _new_producer, start's).

    def _new_producer(self) -> Producer | None:
        """A producer with this sink's settings, or None (and the reason as the sink's problem) if refused."""
        try:
            producer = Producer(self.producer_config())
        except KafkaException as error:
            self._problem = f"the Kafka producer could not be created: {scrub(error.args[0].str(), self.client_config)}"
            self._log.error("kafka_producer_refused", reason=self._problem)
            self._first_try.set()
            return None
        self._problem = f"Kafka not connected (connecting to {', '.join(self.bootstrap_servers)})"
        return producer

    def _serve(self) -> None:
        """Serve the producer's callbacks until close; replace it after a fatal error."""
        while not self._stop.is_set():
            producer = self._producer
            if producer is None:
                self._stop.wait(POLL_TIMEOUT)
                continue
            try:
                producer.poll(POLL_TIMEOUT)
            except KafkaException as error:
                # poll raises a fatal error too, once it has been handed to error_cb.
                self._replace_reason = self._replace_reason or error.args[0].str()
            if self._replace_reason is not None:
                self._replace(producer)

    def _replace(self, producer: Producer) -> None:
        """Fail what the unusable producer holds (503s) and put a new one in its place."""
        reason, self._replace_reason = self._replace_reason, None
        self._problem = f"the Kafka producer is being replaced: {reason}"
        self._log.error("kafka_producer_replaced", reason=reason)
        producer.purge()
        # The purged records' delivery reports (failures), so that their batches are answered at once.
        producer.poll(0)
        self._producer = self._new_producer()

    def _on_stats(self, stats_json: str) -> None:
        """librdkafka's statistics: ready once a broker is up and the producer has its producer id."""
        if self._producer is None or self._replace_reason is not None:
            return
        stats = orjson.loads(stats_json)
        # Brokers learnt from metadata have node ids from 0; the bootstrap addresses have -1.
        up = any(broker["state"] == "UP" and broker["nodeid"] >= 0 for broker in stats["brokers"].values())
        idempotence = stats.get("eos", {}).get("idemp_state")
        if not up:
            problem = f"Kafka not connected (connecting to {', '.join(self.bootstrap_servers)})"
        elif idempotence != "Assigned":
            problem = f"Kafka producer id not assigned yet (state {idempotence})"
        else:
            problem = None
        if problem is None and self._problem is not None:
            self._logged_errors.clear()
            self._log.info("kafka_connected", servers=self.bootstrap_servers)
            self._first_try.set()
        self._problem = problem

    def _on_error(self, error: KafkaError) -> None:
        """librdkafka's error reports: connection failures (logged once each until ready again), and fatal errors."""
        self._first_try.set()
        if error.fatal():
            self._replace_reason = scrub(error.str(), self.client_config)
            return
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            self._problem = f"Kafka not connected (connecting to {', '.join(self.bootstrap_servers)})"
        text = scrub(error.str(), self.client_config)
        # "(after 3ms in state CONNECT)" differs between two tries that failed alike.
        seen = ELAPSED.sub("", text)
        if seen not in self._logged_errors:
            self._logged_errors.add(seen)
            self._log.warning("kafka_error", error=text, code=error.name(), servers=self.bootstrap_servers)
