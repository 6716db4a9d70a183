"""The event log: each accepted event rendered as one JSON line, through structlog, and handed to every sink.

structlog emits event lines as it emits any log line: the ingestor calls
``logger.info(events=..., **context)`` on the logger that ``event_logger``
builds; its processor, ``render_lines``, renders the batch (each event with the
request's context); its logger, the ``EventLog``, hands the ``Batch`` to the
sinks. A sink is where lines go and says when it holds them: ``StdoutSink``
writes them to stdout whole, under a lock (``analytics.stdout``).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import orjson
import structlog

from analytics.lines import TIME_OPTIONS, escape_line_breaks
from analytics.stdout import LockedWriter


@dataclass(frozen=True)
class Batch:
    """One request's accepted events, as every sink takes them: each event (as written) and its line."""

    events: Sequence[dict[str, Any]]
    # Every event's line, each ending in a newline, in one buffer: what stdout takes in one write.
    text: bytes

    @cached_property
    def lines(self) -> list[bytes]:
        """Each event's line without its newline, in order: a message body for a stream sink."""
        # Lines hold no raw newline (JSON escapes it), so the newlines are exactly the ends of lines.
        return self.text.split(b"\n")[:-1]


class SinkUnavailableError(Exception):
    """A sink cannot take the batch now, and may later: the client should retry it (a 503 with Retry-After)."""


class Sink(Protocol):
    """Where event lines go. ``write`` returns only once the sink holds every line, and raises otherwise."""

    name: str

    def write(self, batch: Batch) -> None:
        """Take the batch whole, or raise."""

    def unready_reason(self) -> str | None:
        """Why the sink cannot take a batch now (for /readyz), or None when it can."""


class StdoutSink:
    """Event lines on stdout, one batch at a time, never interleaved with another worker's."""

    name = "stdout"

    def __init__(self, writer: LockedWriter, min_free: int) -> None:
        self.writer = writer
        # Free bytes a file's filesystem needs for the sink to be ready: the most one request writes.
        self.min_free = min_free

    def unready_reason(self) -> str | None:
        return self.writer.unready_reason(self.min_free)

    def write(self, batch: Batch) -> None:
        # One buffer, one locked write: a batch is never split between two writers.
        self.writer.write(batch.text)


# How every line starts; the event's type comes next.
EVENT_HEAD = b'{"kind":"event",'


def render_lines(logger: Any, method_name: str, event_dict: dict[str, Any]) -> tuple[tuple[Batch], dict]:
    """The structlog processor for event lines: one line per event of the batch, ``kind`` and ``type`` first.

    ``event_dict`` holds the batch's ``events`` and the request's context. The
    context is rendered once, and each event's own JSON has its closing brace
    replaced by it: one join builds the whole buffer, and one scan escapes its line breaks.
    """
    events = event_dict.pop("events")
    utc = TIME_OPTIONS
    ending = (b"," + orjson.dumps(event_dict, option=utc)[1:] if event_dict else b"}") + b"\n"
    if all([next(iter(event)) == "type" for event in events]):
        # Clients send the type first (analytics.js does): each event's own JSON, braces off, follows "kind"
        # as it is, without building a dict per event (a third of the rendering).
        between = ending + EVENT_HEAD
        text = EVENT_HEAD + between.join([orjson.dumps(event, option=utc)[1:-1] for event in events]) + ending
    else:
        heads = [orjson.dumps({"kind": "event", "type": event["type"], **event}, option=utc)[:-1] for event in events]
        text = ending.join(heads) + ending
    return (Batch(events, escape_line_breaks(text)),), {}


class EventLog:
    """The logger at the end of the event chain: gives each batch's lines to every sink, in order."""

    def __init__(self, sinks: Sequence[Sink]) -> None:
        self.sinks = tuple(sinks)

    def info(self, batch: Batch) -> None:
        for sink in self.sinks:
            sink.write(batch)

    def unready_reason(self) -> str | None:
        """Why some sink cannot take a batch now, or None when every one can."""
        for sink in self.sinks:
            reason = sink.unready_reason()
            if reason:
                return reason
        return None


def event_logger(event_log: EventLog) -> Any:
    """The structlog logger that renders batches into ``event_log``; it carries no context of its own."""
    return structlog.wrap_logger(
        event_log,
        processors=[render_lines],
        wrapper_class=structlog.BoundLogger,
        cache_logger_on_first_use=True,
    )
