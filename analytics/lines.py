"""How an event becomes bytes of a line: compact JSON, with every character that log tools split lines on escaped.

One definition, for the size check (an event is refused when its line would be
too long) and for the event log (which writes exactly that), so the limit
applies to what is written.
"""

from typing import Any

import orjson

# What a line may hold besides its event's own bytes: "kind", the event's timestamp rewritten
# as RFC 3339 (up to 27 bytes more), and the context (a 128-character request id, a
# 45-character address, two times): about 400 bytes, with room to spare (docs/event-log.md).
CONTEXT_ALLOWANCE = 2048
# Bytes written per decompressed body byte, at most: raw U+0085 grows 3 times, "1e15," 3.8.
GROWTH = 4


def most_written(max_body_bytes: int, max_events: int) -> int:
    """The most one request can make the service write, for a body and a batch at their limits."""
    return GROWTH * max_body_bytes + CONTEXT_ALLOWANCE * max_events


# Lines that log tools split on besides "\n" (Python's splitlines, JavaScript):
# orjson writes these characters raw, so they are escaped to keep a line a line.
# Escaping is what makes a line longer than the JSON it came from (U+0085 is 2 bytes raw, 6 escaped).
_LINE_BREAKS = (
    ("\u2028".encode(), b"\\u2028"),
    ("\u2029".encode(), b"\\u2029"),
    ("\x85".encode(), b"\\u0085"),
)


def escape_line_breaks(data: bytes) -> bytes:
    """``data`` with U+2028, U+2029 and U+0085 written as JSON escapes."""
    # Every one of them starts with one of these bytes: a memchr scan rules them
    # out in well under a microsecond, three substring scans take 50.
    if b"\xe2" in data or b"\xc2" in data:
        for char, escaped in _LINE_BREAKS:
            data = data.replace(char, escaped)
    return data


# Times are written in UTC with "Z"; naive ones (as the service makes them: analytics.timestamps) are UTC.
TIME_OPTIONS = orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC


def encode(value: Any) -> bytes:
    """``value`` as the bytes a line holds: compact JSON (UTC times with Z), line breaks escaped."""
    return escape_line_breaks(orjson.dumps(value, option=TIME_OPTIONS))
