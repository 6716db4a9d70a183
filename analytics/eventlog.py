"""The event log: every accepted event as one JSON line on stdout, a batch at a time.

A batch is rendered into one buffer here and handed to ``analytics.stdout.LockedWriter``,
which writes it whole, never interleaved with another worker's (its docstring says how).
"""

from typing import Any

import orjson
import structlog

from analytics.stdout import LockedWriter

# Lines that log tools split on besides "\n" (Python's splitlines, JavaScript):
# orjson writes these characters raw, so they are escaped to keep a line a line.
_LINE_BREAKS = (
    ("\u2028".encode(), b"\\u2028"),
    ("\u2029".encode(), b"\\u2029"),
    ("\x85".encode(), b"\\u0085"),
)


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
        """Write one line per event, carrying ``context``; raise LogWriteError if they could not all be."""
        # Only the request's keys go on event lines, not every context variable.
        self._logger.info("events", events=events, **context)
