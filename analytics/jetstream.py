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
process has one event loop in a thread of its own, holding one connection
(which answers the server's pings and reconnects between requests too). A
request thread builds the batch's frames, wakes the loop once to write them, and
waits on a lock that the loop releases once the last acknowledgement is in
(see ``write``). The loop is started per process, keyed by its pid, never in the
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
bounded by ``NATS_ACK_TIMEOUT`` from the hand-over. Each message asks for the
stream by name (``Nats-Expected-Stream``), so none is acknowledged by another.
The messages are plain publishes whose reply subjects name the batch and the
event, and one subscription per connection counts the acknowledgements into
the batch's one lock, rather than nats-py's ``publish_async``: that one
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
from nats.protocol.parser import AWAITING_CONTROL_LINE, Parser

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
# A message without reply subject or headers, as a server sends each publish acknowledgement: subject, sid, size.
PLAIN_MSG = re.compile(rb"MSG ([^ \r\n]+) (\d+) (\d+)\r\n")


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
    """The acknowledgements one batch waits for, each event's counted once; ``done``, a lock taken at the start, is
    released (by the loop's thread) once all are in, or the batch could not be sent (``error``)."""

    __slots__ = ("expected", "received", "failures", "error", "finished", "done")

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.received: set[bytes] = set()
        self.failures: list[Exception] = []
        self.error: SinkUnavailableError | None = None
        self.finished = False
        self.done = threading.Lock()
        self.done.acquire()

    def finish(self, error: SinkUnavailableError | None = None) -> None:
        """Wake the request waiting for this batch; once (only the loop's thread calls it)."""
        self.error = error
        self.finished = True
        self.done.release()


class _AckParser(Parser):
    """nats-py's protocol parser, first reading as many whole acknowledgements as the buffer starts with in one
    tight loop, each handed to ``on_ack`` as it is: nats-py's general loop tries each frame against its patterns
    in turn and makes a coroutine per message (4.0 against 2.0 µs an acknowledgement, counting included, the best
    of 15 runs in one process: 0.2 ms of a write at 100 events). Anything else (a PING, an INFO, an error, a reply
    to the JetStream API, a message with headers or a reply subject) and what follows it in the buffer goes through
    nats-py's loop, as does a frame cut between two reads once nats-py has taken its control line."""

    async def parse(self, data: bytes = b"") -> None:
        buf = self.buf
        buf.extend(data)
        nc = self.nc
        start = 0
        while self.state == AWAITING_CONTROL_LINE:
            frame = PLAIN_MSG.match(buf, start)
            if frame is None or int(frame[2]) != nc.ack_sid:
                break
            body = frame.end()
            end = body + int(frame[3])
            if len(buf) < end + 2:
                # The rest of this acknowledgement comes with the next read.
                del buf[:start]
                return
            nc.on_ack(frame[1], bytes(buf[body:end]), None)
            start = end + 2
        del buf[:start]
        if buf:
            await super().parse()


class _Connection(NatsClient):
    """nats-py's client with shortcuts for a batch, which at 100 events a batch took the sink's time per write
    from 4.1 to 2.5 ms (bench/sink_write.py): ``send`` writes a whole batch of ready-made frames where ``publish``
    would check, build and queue each message (a quarter of the sink's time), and the sink's acknowledgements go
    from the protocol parser (``_AckParser``) straight to ``on_ack`` where nats-py would make each a ``Msg``, queue
    it and wake a task to hand it over (a sixth). They lean on nats-py's internals, of the version requirements.txt
    pins; tests/test_nats.py covers them (every kind of acknowledgement, cut anywhere between reads, ids, headers)."""

    def __init__(self, on_ack: Callable[[bytes, bytes, bytes | None], None]) -> None:
        super().__init__()
        self.on_ack = on_ack
        # The subscription id of the acknowledgements, once subscribed (nats-py keeps it across reconnections).
        self.ack_sid: int | None = None
        self._ps = _AckParser(self)

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        if sid == self.ack_sid:
            self.on_ack(subject, data, headers)
        else:
            await super()._process_msg(sid, subject, reply, data, headers)

    def send(self, frames: bytes) -> None:
        """Write protocol frames in order after whatever nats-py holds: straight to the transport when it holds
        nothing (as its flusher task would, a loop turn later, and as nats-py writes a PING), else queued for that
        task. In the loop's thread: the transport is not thread-safe."""
        if not self._pending and self._transport:
            self._transport.write(frames)
            return
        self._pending.append(frames)
        self._pending_data_size += len(frames)
        if self._flush_queue is not None and self._flush_queue.empty():
            self._flush_queue.put_nowait(asyncio.get_running_loop().create_future())


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
        # Reply subjects are "<inbox>.<batch>.<event>", the prefix "<inbox>." (bytes, as the parser gives subjects);
        # the acknowledgements awaited, by batch (added and removed by the requests' threads, read by the loop's:
        # single dict operations, atomic under the GIL).
        self._reply_prefix = b""
        self._waiting: dict[bytes, _Acks] = {}
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
        if self._pid == os.getpid():
            return
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
        if not self._first_try.is_set():
            self._first_try.wait(CONNECT_TIMEOUT + self.ack_timeout)
        nc = self._nc
        if nc is None or not nc.is_connected:
            state = "connecting" if nc is None or self._js is None else "reconnecting"
            return f"NATS not connected ({state} to {', '.join(self.servers)})"
        return self._stream_problem

    def write(self, batch: Batch) -> None:
        """Send the batch and wait, at most ``ack_timeout``, for every event's acknowledgement.

        The frames are built here; the loop's thread is woken once to write them (``_send``) and wakes this
        thread once all acknowledgements are in (``_on_ack``): one callback and one lock, rather than a task,
        an asyncio future, a timer and a concurrent future per batch, which cost more than the sending itself.
        """
        reason = self.unready_reason()
        if reason:
            raise SinkUnavailableError(reason)
        assert self._loop
        number = b"%d" % next(self._batch_numbers)
        frames = self._frames(batch, self._reply_prefix + number + b".")
        acks = self._waiting[number] = _Acks(len(batch.lines))
        try:
            self._loop.call_soon_threadsafe(self._send, frames, acks)
            if not acks.done.acquire(timeout=self.ack_timeout):
                raise SinkUnavailableError(
                    f"{acks.expected - len(acks.received)} of {acks.expected} JetStream acknowledgements did not "
                    f"arrive within {self.ack_timeout} s"
                )
        finally:
            # Answers that come later find no batch, and are dropped.
            del self._waiting[number]
        if acks.error:
            raise acks.error
        if acks.failures:
            raise SinkUnavailableError(
                f"JetStream refused {len(acks.failures)} of {acks.expected} events: {acks.failures[0]}"
            )

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
        inbox = nc.new_inbox()
        self._reply_prefix = f"{inbox}.".encode()
        nc.ack_sid = (await nc.subscribe(f"{inbox}.>"))._id
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

    def _send(self, frames: bytes, acks: _Acks) -> None:
        """Write a batch's frames, unless the connection is down (then its request is answered at once)."""
        assert self._nc
        if not self._nc.is_connected:
            acks.finish(SinkUnavailableError("NATS connection lost"))
            return
        try:
            self._nc.send(frames)
        except (NatsError, OSError) as error:
            acks.finish(SinkUnavailableError(f"publishing to NATS failed: {error!r}"))

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
        number, _, index = subject[len(self._reply_prefix) :].rpartition(b".")
        acks = self._waiting.get(number)
        if acks is None or acks.finished or index in acks.received:
            # A batch given up (timed out), or an answer counted already.
            return
        acks.received.add(index)
        if headers and headers.startswith(NO_RESPONDERS):
            acks.failures.append(NoStreamResponseError())
            if self._recheck:
                # Nothing took the subject: the stream may be gone; look (and create it) again.
                self._recheck.set()
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
            acks.finish()

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
