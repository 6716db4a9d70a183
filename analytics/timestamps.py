"""The two timestamp forms clients send, ISO 8601 and Unix time, as aware UTC datetimes."""

import math
from datetime import UTC, datetime

# Unix times at or above this are milliseconds: 10**11 seconds is the year 5138,
# while 10**11 milliseconds is 1973, so no real timestamp is ambiguous.
MILLISECONDS_FROM = 10**11


def parse_timestamp(value: object) -> datetime:
    """Return ``value`` as an aware UTC datetime, or raise ValueError.

    Strings are ISO 8601, with ``Z``, an offset, or no zone (taken as UTC).
    Numbers are Unix time in seconds, or milliseconds from 10**11 on.
    """
    try:
        if isinstance(value, str):
            parsed = datetime.fromisoformat(value)
            if parsed.tzinfo is UTC:  # "Z", what browsers send: nothing to convert
                return parsed
            if parsed.tzinfo is None:
                return parsed.replace(tzinfo=UTC)
            return parsed.astimezone(UTC)
        # bool is an int subclass, and True is no timestamp.
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError("not a finite number")
            seconds = value / 1000 if abs(value) >= MILLISECONDS_FROM else value
            return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError) as error:
        # Out of datetime's range (years 1 to 9999).
        raise ValueError(str(error)) from error
    raise ValueError(f"not a timestamp: {type(value).__name__}")
