"""The NATS JetStream sink: each accepted event one message on a stream, a batch taken only once all are stored.

Each event is one message on ``NATS_SUBJECT``; its body is the event's line as
the stdout sink writes it (without the newline), and its ``id``, when it has
one, travels as the ``Nats-Msg-Id`` header, so that JetStream drops a retried
copy within the stream's duplicate window. ``write`` returns only once every
message of the batch has its JetStream publish acknowledgement (on a replicated
stream: stored by a quorum), and raises ``SinkUnavailableError`` otherwise,
which the ingestor answers with a 503 and Retry-After: the client retries the
whole batch, and the ids make that safe.

How it runs. nats-py is asyncio and gunicorn's workers are sync, so each worker
process has one event loop in a thread of its own, holding one connection; a
request thread hands it a batch with ``run_coroutine_threadsafe`` and waits for
the outcome (a hand-over measured at about 50 microseconds, against a network
round trip). The loop is started per process, keyed by its pid, never in the
gunicorn master (which builds the app once to check settings and then forks:
a thread or a connection made there would not survive the fork), by gunicorn's
``post_worker_init`` hook as soon as a worker has loaded the app, or else by the
first ``write`` or ``unready_reason`` (any other server). Starting only starts
the thread: connecting happens in the background and is retried for ever, so a
worker boots whether or not the engine is up (gunicorn stops the whole server
when a worker fails to boot), answers 503 until connected, and /readyz says so.

On connecting (and again after every reconnection, since the servers may have
been replaced) the stream is looked up: an existing one is used as it is, but
only if its subjects cover ``NATS_SUBJECT`` (else no event is taken, and stderr
and /readyz say why, re-checked every few seconds); a missing one is created at
once with file storage, ``NATS_REPLICAS`` replicas and the duplicate window.

A batch is published pipelined: every message goes out (as one buffer of
protocol frames, see ``_Connection``), then the acknowledgements are awaited together,
bounded by ``NATS_ACK_TIMEOUT`` from the start. Each message asks for the
stream by name (``Nats-Expected-Stream``), so none is acknowledged by another.
The messages are plain publishes whose reply subjects name the batch and the
event, and one subscription per connection counts the acknowledgements into
the batch's one future, rather than nats-py's ``publish_async``: that one
builds a future, a random token and a ``PubAck`` per message, which made the
sink's loop a bottleneck (at 100 events a batch 1.6 times the time per write).

Why not JetStream's atomic batch publish (server 2.12+, ADR-50: up to 1000
messages staged and committed all or none). It would make a batch's events
appear together, but (1) it rejects a whole batch when any of its
``Nats-Msg-Id`` is a duplicate ("atomic publish batch contains duplicate
message id"), and our retry model is exactly a batch resent with ids of which
some, or all, may be stored already: a client whose 200 was lost could never
get one again; (2) it needs ``allow_atomic`` on the stream, while an existing
stream is used as it is; (3) nats-py 2.16 has no API to publish one. Per-message
publishes with ids are idempotent per event, which is the guarantee a retried
batch needs; a batch answered 503 may be stored in part, and its retry completes it.
"""

import asyncio
import concurrent.futures
import itertools
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

import orjson
import structlog
from nats.aio.client import Client as NatsClient
from nats.errors import Error as NatsError
from nats.js.api import Header, StorageType, StreamConfig
from nats.js.client import JetStreamContext
from nats.js.errors import APIError, BadRequestError, NoStreamResponseError, NotFoundError

from analytics.eventlog import Batch, SinkUnavailableError

log = structlog.get_logger()

# Between two tries of a server that did not answer: a returning engine is used within this.
RECONNECT_WAIT = 0.5
# How long one try to connect may take.
CONNECT_TIMEOUT = 2
# Pings on an idle connection, and unanswered ones before it counts as lost: a server that
# vanished without closing the connection (a partition) is noticed within about 20 s.
PING_INTERVAL = 10
MAX_OUTSTANDING_PINGS = 2
# Between two checks of a stream that could not be used (missing subject, no quorum to create it).
STREAM_RECHECK = 1.0
# Beyond NATS_ACK_TIMEOUT, for the hand-over between threads; the loop bounds the publish itself.
HANDOVER_SLACK = 1.0
# Closing a worker's connection (flushing what is buffered) at exit.
CLOSE_TIMEOUT = 5.0
# Characters an id keeps as they are in Nats-Msg-Id: printable ASCII but space and "%". nats-py
# strips a value and turns CR and LF into spaces, so other ids are percent-encoded (UTF-8) rather
# than merged: "%" always encoded keeps the mapping one to one.
ID_SAFE = "".join(chr(code) for code in range(0x21, 0x7F) if chr(code) != "%")
# An id made only of those characters (a UUID, say), which needs no encoding: checked at C speed, as
# ``quote`` was a sixth of the sink's time at 100 events a batch.
PLAIN_ID = re.compile(r"[!-$&-~]+")
# The header block a server answers a request with when nothing subscribes to its subject: no stream takes it.
NO_RESPONDERS = b"NATS/1.0 503"


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether the stream subject ``pattern`` (with NATS wildcards: "*" one token, ">" the rest) covers ``subject``."""
    tokens = subject.split(".")
    for index, part in enumerate(pattern.split(".")):
        if part == ">":
            return index < len(tokens)
        if index >= len(tokens) or part not in ("*", tokens[index]):
            return False
    return len(pattern.split(".")) == len(tokens)


def message_id(event: Mapping[str, Any]) -> str | None:
    """The event's ``id`` as its Nats-Msg-Id: as it is unless it holds a space, "%" or a non-printable or
    non-ASCII character, then percent-encoded; None for an event without one."""
    event_id = event.get("id")
    if not event_id:
        return None
    return event_id if PLAIN_ID.fullmatch(event_id) else quote(event_id, safe=ID_SAFE)


class _Acks:
    """The acknowledgements one batch waits for: each event's counted once, ``done`` resolved when all are in."""

    __slots__ = ("expected", "received", "failures", "done")

    def __init__(self, expected: int, done: asyncio.Future) -> None:
        self.expected = expected
        self.received: set[str] = set()
        self.failures: list[Exception] = []
        self.done = done


class _Connection(NatsClient):
    """nats-py's client with two shortcuts for a batch, which at 100 events a batch took the sink's time per
    write from 4.1 to 2.5 ms (bench/sink_write.py): ``send`` queues a whole batch of ready-made frames where
    ``publish`` would check, build and queue each message (a quarter of the sink's time), and the sink's
    acknowledgements go from the protocol parser straight to ``on_ack`` where nats-py would make each a ``Msg``,
    queue it and wake a task to hand it over (a sixth). Both lean on nats-py's internals, of the version
    requirements.txt pins; tests/test_nats.py covers them (every kind of acknowledgement, ids, headers)."""

    def __init__(self, on_ack: Callable[[bytes, bytes, bytes | None], None]) -> None:
        super().__init__()
        self.on_ack = on_ack
        # The subscription id of the acknowledgements, once subscribed (nats-py keeps it across reconnections).
        self.ack_sid: int | None = None

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        if sid == self.ack_sid:
            self.on_ack(subject, data, headers)
        else:
            await super()._process_msg(sid, subject, reply, data, headers)

    async def send(self, frames: bytes) -> None:
        """Queue protocol frames for nats-py's flusher task, as ``publish`` queues one message's."""
        await self._send_command(frames)
        if self._flush_queue is not None and self._flush_queue.empty():
            await self._flush_pending()


class JetStreamSink:
    """Event lines as messages on a JetStream stream; ``write`` returns once every one is acknowledged."""

    name = "nats"

    def __init__(
        self,
        servers: Sequence[str],
        stream: str,
        subject: str,
        replicas: int,
        duplicate_window: float,
        ack_timeout: float,
    ) -> None:
        self.servers = list(servers)
        self.stream = stream
        self.subject = subject
        self.replicas = replicas
        self.duplicate_window = duplicate_window
        self.ack_timeout = ack_timeout
        self._start_lock = threading.Lock()
        self._pid: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: concurrent.futures.Future | None = None
        self._nc: _Connection | None = None
        self._js: JetStreamContext | None = None
        # Reply subjects are "<prefix>.<batch>.<event>"; the acknowledgements awaited, by batch.
        self._reply_prefix = ""
        self._waiting: dict[str, _Acks] = {}
        self._batch_numbers = itertools.count()
        # Why the stream cannot take events (not yet checked, or unusable), None once it can.
        self._stream_problem: str | None = "stream not checked yet"
        # Set (in the loop) when the stream must be looked at again: a reconnection, a publish nobody answered.
        self._recheck: asyncio.Event | None = None
        # The connection errors logged since the last connection, so that a long outage is a line on stderr
        # per server and error, not one per try.
        self._logged_errors: set[str] = set()
        self._closing = False
        self._log = log
        # Set once the first try to connect has failed, or has succeeded and the stream has been checked.
        self._first_try = threading.Event()

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "JetStreamSink":
        """The sink the NATS_* settings describe."""
        return cls(
            servers=config["NATS_SERVERS"],
            stream=config["NATS_STREAM"],
            subject=config["NATS_SUBJECT"],
            replicas=config["NATS_REPLICAS"],
            duplicate_window=config["NATS_DUPLICATE_WINDOW"],
            ack_timeout=config["NATS_ACK_TIMEOUT"],
        )

    # In the caller's thread.

    def start(self) -> None:
        """Start connecting, in the background, in this process; once per process (a forked child starts its own)."""
        with self._start_lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._log = log.bind(worker=self._pid)
            self._nc = None
            self._js = None
            self._closing = False
            self._first_try = threading.Event()
            self._stream_problem = "stream not checked yet"
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, name="nats-sink", daemon=True)
            self._thread.start()
            self._runner = asyncio.run_coroutine_threadsafe(self._run(), self._loop)
            self._runner.add_done_callback(_log_stop)

    def unready_reason(self) -> str | None:
        self.start()
        # A worker just started would otherwise turn its first requests away while connecting, which takes
        # milliseconds; the wait is bounded, and over as soon as a try fails (a refused connection at once).
        self._first_try.wait(CONNECT_TIMEOUT + self.ack_timeout)
        nc = self._nc
        if nc is None or not nc.is_connected:
            state = "connecting" if nc is None or self._js is None else "reconnecting"
            return f"NATS not connected ({state} to {', '.join(self.servers)})"
        return self._stream_problem

    def write(self, batch: Batch) -> None:
        reason = self.unready_reason()
        if reason:
            raise SinkUnavailableError(reason)
        assert self._loop
        outcome = asyncio.run_coroutine_threadsafe(self._publish(batch), self._loop)
        try:
            outcome.result(self.ack_timeout + HANDOVER_SLACK)
        except concurrent.futures.TimeoutError:
            outcome.cancel()
            raise SinkUnavailableError(f"no outcome from the NATS sink within {self.ack_timeout} s") from None

    def close(self) -> None:
        """Close this process's connection, sending what it holds, and stop its loop; bounded by CLOSE_TIMEOUT."""
        with self._start_lock:
            if self._pid != os.getpid() or not self._loop or not self._thread:
                return
            loop, thread = self._loop, self._thread
            self._pid = self._loop = self._thread = None
        try:
            asyncio.run_coroutine_threadsafe(self._close(), loop).result(CLOSE_TIMEOUT)
        except (concurrent.futures.TimeoutError, NatsError, OSError) as error:
            self._log.warning("nats_close_failed", error=repr(error))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(CLOSE_TIMEOUT)

    # In the loop's thread.

    async def _run(self) -> None:
        """Connect (retried for ever), then keep the stream checked: at once, after every reconnection, and
        every STREAM_RECHECK seconds while it cannot be used."""
        self._recheck = asyncio.Event()
        nc = _Connection(self._on_ack)
        self._nc = nc
        await nc.connect(
            self.servers,
            name=f"analytics-{os.getpid()}",
            connect_timeout=CONNECT_TIMEOUT,
            reconnect_time_wait=RECONNECT_WAIT,
            max_reconnect_attempts=-1,
            ping_interval=PING_INTERVAL,
            max_outstanding_pings=MAX_OUTSTANDING_PINGS,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
        )
        # Subscribed before any publish; nats-py subscribes again after each reconnection.
        self._reply_prefix = nc.new_inbox()
        nc.ack_sid = (await nc.subscribe(f"{self._reply_prefix}.>"))._id
        self._js = nc.jetstream(timeout=self.ack_timeout)
        self._logged_errors.clear()
        self._log.info("nats_connected", server=_url(nc))
        while True:
            self._recheck.clear()
            problem = await self._check_stream()
            if problem != self._stream_problem and problem:
                self._log.error("nats_stream_unusable", stream=self.stream, subject=self.subject, reason=problem)
            self._stream_problem = problem
            self._first_try.set()
            try:
                await asyncio.wait_for(self._recheck.wait(), STREAM_RECHECK if problem else None)
            except TimeoutError:
                pass

    async def _check_stream(self) -> str | None:
        """Find or create the stream; why it cannot take events, or None when it can."""
        assert self._js
        try:
            try:
                info = await self._js.stream_info(self.stream)
            except NotFoundError:
                config = StreamConfig(
                    name=self.stream,
                    subjects=[self.subject],
                    storage=StorageType.FILE,
                    num_replicas=self.replicas,
                    duplicate_window=self.duplicate_window,
                )
                try:
                    info = await self._js.add_stream(config)
                    self._log.info(
                        "nats_stream_created", stream=self.stream, subject=self.subject, replicas=self.replicas
                    )
                except BadRequestError:
                    # Another worker created it first, maybe otherwise: used as it is, like any existing one.
                    info = await self._js.stream_info(self.stream)
        except (NatsError, OSError, TimeoutError) as error:
            return f"stream {self.stream} could not be looked up or created: {error!r}"
        subjects = info.config.subjects or []
        if not any(subject_matches(pattern, self.subject) for pattern in subjects):
            return f"stream {self.stream} does not take subject {self.subject} (its subjects: {', '.join(subjects)})"
        return None

    async def _publish(self, batch: Batch) -> None:
        """Send every event of the batch, then wait for all acknowledgements, within ack_timeout of the start."""
        assert self._nc
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ack_timeout
        number = str(next(self._batch_numbers))
        acks = self._waiting[number] = _Acks(len(batch.lines), loop.create_future())
        try:
            frames = self._frames(batch, f"{self._reply_prefix}.{number}.".encode())
            if not self._nc.is_connected:
                raise SinkUnavailableError("NATS connection lost")
            await self._nc.send(frames)
            await asyncio.wait_for(acks.done, max(0.0, deadline - loop.time()))
        except (NatsError, OSError) as error:
            raise SinkUnavailableError(f"publishing to NATS failed: {error!r}") from None
        except TimeoutError:
            raise SinkUnavailableError(
                f"{acks.expected - len(acks.received)} of {acks.expected} JetStream acknowledgements did not arrive "
                f"within {self.ack_timeout} s"
            ) from None
        finally:
            del self._waiting[number]
        if acks.failures:
            if any(isinstance(failure, NoStreamResponseError) for failure in acks.failures) and self._recheck:
                # Nothing took the subject: the stream may be gone; look (and create it) again.
                self._recheck.set()
            raise SinkUnavailableError(
                f"JetStream refused {len(acks.failures)} of {acks.expected} events: {acks.failures[0]}"
            )

    def _frames(self, batch: Batch, reply: bytes) -> bytes:
        """The batch's messages as NATS protocol frames: for each event, ``HPUB <subject> <reply><index> <header
        size> <total size>``, then its headers (Nats-Expected-Stream, and Nats-Msg-Id when it has an id) and its
        line. Subject, stream and reply are checked names and ids are made plain by ``message_id``, so nothing
        here can break a frame; a message larger than the server takes is refused as ``publish`` would."""
        assert self._nc
        subject = self.subject.encode()
        expected = f"NATS/1.0\r\n{Header.EXPECTED_STREAM}: {self.stream}\r\n".encode()
        most = self._nc.max_payload
        parts = []
        for index, (event, line) in enumerate(zip(batch.events, batch.lines, strict=True)):
            event_id = message_id(event)
            headers = expected + b"Nats-Msg-Id: " + event_id.encode() + b"\r\n\r\n" if event_id else expected + b"\r\n"
            size = len(headers) + len(line)
            if size > most:
                raise SinkUnavailableError(f"an event of {size} bytes is more than the NATS server takes ({most})")
            parts += (b"HPUB %s %s%d %d %d\r\n" % (subject, reply, index, len(headers), size), headers, line, b"\r\n")
        return b"".join(parts)

    def _on_ack(self, subject: bytes, data: bytes, headers: bytes | None) -> None:
        """Count one event's acknowledgement (its reply subject, body and raw header block) into its batch: stored
        (a duplicate too), or refused and why."""
        number, _, index = subject[len(self._reply_prefix) + 1 :].decode().rpartition(".")
        acks = self._waiting.get(number)
        if acks is None or acks.done.done() or index in acks.received:
            # A batch given up (timed out, cancelled), or an answer counted already.
            return
        acks.received.add(index)
        if headers and headers.startswith(NO_RESPONDERS):
            acks.failures.append(NoStreamResponseError())
        else:
            try:
                answer = orjson.loads(data)
                if "error" in answer:
                    # Raises the error the answer describes, as nats-py's own classes have it.
                    APIError.from_error(answer["error"])
            except APIError as error:
                acks.failures.append(error)
            except (orjson.JSONDecodeError, TypeError, KeyError) as error:
                acks.failures.append(APIError(description=f"unreadable acknowledgement {data[:200]!r}: {error!r}"))
        if len(acks.received) == acks.expected:
            acks.done.set_result(None)

    async def _close(self) -> None:
        """Stop checking the stream and close the connection."""
        self._closing = True
        if self._runner:
            self._runner.cancel()
        if self._nc and not self._nc.is_closed:
            await self._nc.close()

    async def _on_error(self, error: Exception) -> None:
        self._first_try.set()
        if repr(error) not in self._logged_errors:
            self._logged_errors.add(repr(error))
            self._log.warning("nats_error", error=repr(error), servers=self.servers)

    async def _on_disconnected(self) -> None:
        if self._js and not self._closing:
            self._log.warning("nats_disconnected", servers=self.servers)

    async def _on_reconnected(self) -> None:
        self._logged_errors.clear()
        self._log.info("nats_reconnected", server=_url(self._nc))
        if self._recheck:
            self._recheck.set()


def _log_stop(runner: concurrent.futures.Future) -> None:
    """Say on stderr why the sink stopped connecting, were it ever to stop other than by ``close``."""
    if not runner.cancelled() and runner.exception():
        log.error("nats_sink_stopped", error=repr(runner.exception()))


def _url(nc: NatsClient | None) -> str | None:
    """The server a client is connected to, for the log."""
    url = nc.connected_url if nc else None
    return url.geturl() if url else None
