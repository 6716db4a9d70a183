"""The two timestamp forms clients send, ISO 8601 and Unix time, as naive datetimes in UTC.

Naive, because every time in the service is UTC and orjson writes a naive
datetime (with OPT_NAIVE_UTC, as UTC with "Z") in a fifth of the time an aware
one takes: a line holds two per event (lines.TIME_OPTIONS).
"""

import math
from datetime import UTC, datetime, timedelta

# An aware time made naive by arithmetic, exact to the microsecond: datetime.replace(tzinfo=None) costs a
# microsecond in CPython 3.11, five times as much.
UTC_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
NAIVE_EPOCH = datetime(1970, 1, 1)

# Unix times at or above this are milliseconds: 10**11 seconds is the year 5138,
# while 10**11 milliseconds is 1973, so no real timestamp is ambiguous.
MILLISECONDS_FROM = 10**11


def naive_utc(moment: datetime) -> datetime:
    """The aware ``moment`` as a naive datetime in UTC; OverflowError past datetime's range."""
    return NAIVE_EPOCH + (moment - UTC_EPOCH)


def parse_timestamp(value: object) -> datetime:
    """Return ``value`` as a naive datetime in UTC, or raise ValueError.

    Strings are ISO 8601, with ``Z``, an offset, or no zone (taken as UTC).
    Numbers are Unix time in seconds, or milliseconds from 10**11 on.
    """
    try:
        if isinstance(value, str):
            parsed = datetime.fromisoformat(value)
            return parsed if parsed.tzinfo is None else naive_utc(parsed)
        # bool is an int subclass, and True is no timestamp.
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError("not a finite number")
            # timedelta rounds the exact value to the microsecond; value / 1000 as a float would not keep every
            # digit (a millisecond time in the year 2300 came out a microsecond early).
            if abs(value) >= MILLISECONDS_FROM:
                return NAIVE_EPOCH + timedelta(milliseconds=value)
            return NAIVE_EPOCH + timedelta(seconds=value)
    except OverflowError as error:
        # Out of datetime's range (years 1 to 9999).
        raise ValueError(str(error)) from error
    raise ValueError(f"not a timestamp: {type(value).__name__}")


def utc_now() -> datetime:
    """The time now, as a naive datetime in UTC."""
    return naive_utc(datetime.now(UTC))
