"""The event log: every accepted event as one JSON line on stdout, a batch at a time.

Several gunicorn workers (and threads) share one stdout, and a pipe makes only
writes of up to 4096 bytes atomic, while one event line can be tens of KiB.
So a batch is rendered into one buffer and written while holding a POSIX
record lock on stdout itself: every process writing to the same pipe, file or
socket waits its turn, and the kernel drops the lock if the holder dies. The
lock belongs to a process, so a thread lock covers the threads within one.
"""

import fcntl
import os
import select
import threading
import time
from typing import Any

import orjson
import structlog

# Lines that log tools split on besides "\n" (Python's splitlines, JavaScript):
# orjson writes these characters raw, so they are escaped to keep a line a line.
_LINE_BREAKS = (
    ("\u2028".encode(), b"\\u2028"),
    ("\u2029".encode(), b"\\u2029"),
    ("\x85".encode(), b"\\u0085"),
)


class LogWriteError(Exception):
    """The event log could not take the batch: nothing of it was written."""


class LockedWriter:
    """Writes whole buffers to a file descriptor, never interleaved with another writer's."""

    def __init__(self, fd: int, timeout: float) -> None:
        self.fd = fd
        self.timeout = timeout
        self._thread_lock = threading.Lock()

    def _lock(self, deadline: float) -> None:
        """Take the record lock by the deadline, polling so a stuck holder cannot hang us."""
        pause = 0.0001
        while True:
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except (BlockingIOError, PermissionError):
                if time.monotonic() + pause > deadline:
                    raise LogWriteError("timed out waiting for the log lock") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.01)

    def _wait_writable(self, deadline: float) -> None:
        """Wait until the descriptor takes bytes, so a blocked reader fails the batch before it starts."""
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        events = poller.poll(max(0.0, deadline - time.monotonic()) * 1000)
        if not events:
            raise LogWriteError("timed out waiting for stdout to accept writes")
        if events[0][1] & (select.POLLERR | select.POLLHUP):
            raise LogWriteError("stdout is closed")

    def write(self, data: bytes) -> None:
        """Write all of ``data`` or raise LogWriteError having written none of it."""
        deadline = time.monotonic() + self.timeout
        if not self._thread_lock.acquire(timeout=self.timeout):
            raise LogWriteError("timed out waiting for the log lock")
        try:
            self._lock(deadline)
            try:
                self._wait_writable(deadline)
                # Once the first byte is out, the rest must follow or the line tears:
                # blocking writes finish it (gunicorn's worker timeout is the backstop).
                view = memoryview(data)
                while view:
                    view = view[os.write(self.fd, view) :]
            finally:
                fcntl.lockf(self.fd, fcntl.LOCK_UN)
        except OSError as error:
            raise LogWriteError(str(error)) from error
        finally:
            self._thread_lock.release()


class EventSink:
    """The structlog logger at the end of the event chain: takes rendered bytes to the writer."""

    def __init__(self, writer: LockedWriter) -> None:
        self.writer = writer

    def info(self, data: bytes) -> None:
        self.writer.write(data)


def render_lines(logger: Any, method_name: str, event_dict: dict[str, Any]) -> bytes:
    """The structlog renderer for event lines: one JSON line per event of the batch.

    ``event_dict`` holds the batch's events and the request's bound context. The
    context is rendered once, and each event's own JSON has its closing brace
    replaced by it: one join builds the whole buffer.
    """
    events = event_dict.pop("events")
    del event_dict["event"]
    ending = (b"," + orjson.dumps(event_dict, option=orjson.OPT_UTC_Z)[1:] if event_dict else b"}") + b"\n"
    data = ending.join(
        [
            orjson.dumps({"kind": "event", "type": event["type"], **event}, option=orjson.OPT_UTC_Z)[:-1]
            for event in events
        ]
    )
    data += ending
    # Every line break to escape starts with one of these bytes: a memchr scan
    # rules them out in well under a microsecond, three substring scans take 50.
    if b"\xe2" in data or b"\xc2" in data:
        for char, escaped in _LINE_BREAKS:
            data = data.replace(char, escaped)
    return data


class EventLog:
    """Writes batches of accepted events through structlog, each event one line."""

    def __init__(self, writer: LockedWriter) -> None:
        self._logger = structlog.wrap_logger(
            EventSink(writer),
            processors=[render_lines],
            wrapper_class=structlog.BoundLogger,
            cache_logger_on_first_use=True,
        )

    def write(self, events: list[dict[str, Any]], **context: Any) -> None:
        """Write one line per event, carrying ``context``; raise LogWriteError if nothing could be."""
        # Only the request's keys go on event lines, not every context variable.
        self._logger.info("events", events=events, **context)
