"""Reading the event log: strict JSON, one object per "\\n"-ended line, no other line break raw in it."""

import json
from typing import Any

# Line breaks other than "\n" that log tools split on: none may reach stdout raw.
RAW_LINE_BREAKS = ("\u2028".encode(), "\u2029".encode(), "\x85".encode())


def strict_json(text: bytes | str) -> Any:
    """Parse JSON as RFC 8259 has it: NaN and Infinity, which Python allows, are errors."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def parse_lines(out: bytes) -> list[Any]:
    """Event log output split on "\\n" only, each line strict JSON; fails on a partial last line or a raw
    U+2028, U+2029 or U+0085, which some log tools would take for the end of a line."""
    assert out == b"" or out.endswith(b"\n"), "the output ends in a partial line"
    for line_break in RAW_LINE_BREAKS:
        assert line_break not in out, f"a raw {line_break!r} in the output"
    return [strict_json(line) for line in out.split(b"\n")[:-1]]
