"""The benchmark harness: bench/run.py drives wrk against the service and bench/floor.py.

Its modules by job: ``cli`` (the command line), ``payloads`` (request bodies),
``servers`` (the floor and the service under gunicorn), ``natsstore`` (the
nats-server the nats sink writes to), ``kafkastore`` (the Kafka broker), ``wrk`` (driving wrk),
``measure`` (one run, checked) and ``report`` (the table and the raw results); ``inprocess`` calls the two
apps in one process, without gunicorn.
"""

import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024


class BenchError(Exception):
    """The harness could not measure: a server did not start, or answered wrongly."""


def settle(
    count: Callable[[], int], what: str, quiet: float, timeout: float, done: Callable[[], bool] = lambda: True
) -> int:
    """``count()`` once it has not changed for ``quiet`` seconds and ``done()`` holds (requests in flight are
    done); BenchError, saying ``what`` did not settle, after ``timeout``."""
    deadline = time.monotonic() + timeout
    last, since = count(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        current = count()
        if current != last:
            last, since = current, time.monotonic()
        elif time.monotonic() - since >= quiet and done():
            return current
    raise BenchError(f"{what} did not settle")
