"""The benchmark harness: bench/run.py drives wrk against the service and bench/floor.py.

Its modules by job: ``cli`` (the command line), ``payloads`` (request bodies),
``servers`` (the floor and the service under gunicorn), ``natsstore`` (the
nats-server the nats sink writes to), ``wrk`` (driving wrk),
``measure`` (one run, checked) and ``report`` (the table and the raw results).
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024


class BenchError(Exception):
    """The harness could not measure: a server did not start, or answered wrongly."""
