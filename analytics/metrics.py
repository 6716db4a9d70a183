"""Prometheus metrics: what came in, what was written or dropped and why, how long requests and sinks took.

Every label takes values from a fixed set the code names (the routes' paths,
status codes, drop reasons, sink names), never anything a client chose, so the
number of series stays fixed. ``GET /metrics`` answers only clients within
METRICS_ALLOW. With METRICS off nothing here is built: no wrapper, no route.

Under gunicorn the workers are separate processes. gunicorn.conf.py gives them
prometheus_client's multiprocess mode: a fresh directory in
``PROMETHEUS_MULTIPROC_DIR``, set in the master before prometheus_client is
first imported (it chooses how values are kept at import), where each worker
keeps its values in files of its own; a scrape adds up every file, those of
workers that have exited too, so counters survive a worker's restart, while a
dead worker's ``analytics_workers`` gauge is removed (``worker_gone``).
Anywhere else (the Flask test client, ``flask run``) the values live in the
app's own registry.
"""

import ipaddress
import os
import struct
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import structlog
from flask import Flask, Response, current_app, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client import values as prometheus_values
from werkzeug.exceptions import MethodNotAllowed

from analytics import messages
from analytics.errors import ApiError
from analytics.eventlog import Batch, Sink

log = structlog.get_logger()

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
# Why an event was not written. The first two are the events answered in ``rejected``.
INVALID = "invalid"
TOO_LARGE = "too_large"
DROP_REASONS = (INVALID, TOO_LARGE, "bot", "excluded")
# The path label of requests for a path that is not one of the service's routes.
OTHER_PATH = "other"
# The methods a scrape may use, and every method there is (what /metrics routes, so that it answers them all).
SCRAPE_METHODS = ["GET", "HEAD"]
EVERY_METHOD = [*SCRAPE_METHODS, "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"]
# Seconds: a request takes about half a millisecond of CPU; a stuck one ends at gunicorn's 30 s timeout.
REQUEST_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Seconds: stdout takes a batch in tens of microseconds; a stream waits for its acknowledgements.
SINK_SECONDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
# Events per batch, up to MAX_EVENTS' default.
BATCH_EVENTS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


def multiprocess_mode() -> bool:
    """Whether values go to per-process files (gunicorn.conf.py set the directory) rather than to memory.

    prometheus_client chose when it was imported: a directory set only afterwards
    would have every worker count in memory and /metrics read empty files.
    """
    if MULTIPROC_DIR not in os.environ:
        return False
    if not prometheus_values.ValueClass._multiprocess:
        raise RuntimeError(f"prometheus_client was imported before {MULTIPROC_DIR} was set (see gunicorn.conf.py)")
    return True


def worker_gone(pid: int) -> None:
    """Forget an exited worker's gauges (its counters stay in the sums); for gunicorn's child_exit, in the master."""
    if MULTIPROC_DIR in os.environ:
        prometheus_multiprocess.mark_process_dead(pid)


class Metrics:
    """The service's metrics, one set per app, in the app's own registry."""

    def __init__(self, multiprocess: bool) -> None:
        self.multiprocess = multiprocess
        self.registry = registry = CollectorRegistry()
        # Requests by status are this histogram's _count: one metric fewer to write per request.
        self._requests = Histogram(
            "analytics_http_request_duration_seconds",
            "Seconds from a request entering the app to its answer, by path (a route, or other) and status.",
            ["path", "status"],
            buckets=REQUEST_SECONDS,
            registry=registry,
        )
        self.body_bytes = adder(
            Counter(
                "analytics_request_body_bytes",
                "Bytes of the ingestion bodies read whole, after gzip decompression.",
                registry=registry,
            )
        )
        self._batch_events = observer(
            Histogram(
                "analytics_batch_events",
                "Events per batch checked, valid or not (a batch of more than MAX_EVENTS is refused unchecked).",
                buckets=BATCH_EVENTS,
                registry=registry,
            )
        )
        self.accepted = adder(
            Counter(
                "analytics_events_accepted",
                "Events written to every sink (one line each on stdout).",
                registry=registry,
            )
        )
        dropped = Counter(
            "analytics_events_dropped",
            "Events not written, by reason: invalid and too_large are those answered in rejected.",
            ["reason"],
            registry=registry,
        )
        # Every reason's series exists from the start, so that rate() over it is 0 rather than absent.
        self.dropped = {reason: adder(dropped.labels(reason)) for reason in DROP_REASONS}
        self._sink_seconds = Histogram(
            "analytics_sink_write_duration_seconds",
            "Seconds a sink took to take a batch (or to fail), by sink.",
            ["sink"],
            buckets=SINK_SECONDS,
            registry=registry,
        )
        self._sink_failures = Counter(
            "analytics_sink_write_failures",
            "Batches a sink failed to take (the request was answered 500 or 503), by sink.",
            ["sink"],
            registry=registry,
        )
        self.workers = Gauge(
            "analytics_workers",
            "Worker processes serving now.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        # (path, status) to its histogram's observer: labels() costs a lock and a hash.
        self._by_status: dict[tuple[str, str], Callable[[float], None]] = {}

    def timed(self, sinks: Iterable[Sink]) -> list[Sink]:
        """``sinks``, each timed and its failures counted under its name."""
        return [
            TimedSink(
                sink, observer(self._sink_seconds.labels(sink.name)), adder(self._sink_failures.labels(sink.name))
            )
            for sink in sinks
        ]

    def answered(self, path: str, status: str, seconds: float) -> None:
        """Count a request for ``path`` answered with ``status`` (such as "200") after ``seconds``."""
        observe = self._by_status.get((path, status))
        if observe is None:
            observe = self._by_status[path, status] = observer(self._requests.labels(path, status))
        observe(seconds)

    def checked(self, events: Sequence[Any], rejected: Sequence[dict[str, Any]]) -> None:
        """Count a batch of ``events`` and the ``rejected`` entries answered for it."""
        self._batch_events(len(events))
        if not rejected:
            return
        too_large = sum(1 for entry in rejected if is_too_large(events[entry["index"]], entry["errors"]))
        if too_large:
            self.dropped[TOO_LARGE](too_large)
        if too_large < len(rejected):
            self.dropped[INVALID](len(rejected) - too_large)

    def exposition(self) -> bytes:
        """The text format of every metric: of all the workers' files in multiprocess mode, else of this registry."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)


# Every request updates about eight values. Through prometheus_client's Counter.inc and Histogram.observe, metrics
# cost a one-event request about 72,000 instructions (valgrind), 5.4% of what it costs through gunicorn, plus a
# system call per value: those calls check and do, every time, what holds for every call here (the labels are
# set, the amount is not negative), walk the buckets one by one, and take a lock and ask the kernel for the
# process id, to find out whether the process has forked since. So the hot path goes to each value itself
# (``adder``, ``observer``): a bucket found by bisection, one lock of ours, a fork noticed through
# os.register_at_fork, the two doubles packed into their place in the file. Metrics then cost 50,000 instructions
# (3.8%) and no system call (docs/operating.md, "Metrics"). tests/test_metrics.py checks the exposition that
# results, value by value: in one process, across gunicorn's workers and across a fork.

# A value's place in prometheus_client's files holds it and a timestamp, two doubles.
_write_value = struct.Struct("dd").pack_into
# Forks this process has made since it started, as the child counts them.
_forks = 0
# The values' own lock is private to prometheus_client: these take turns under this one (gthread workers).
_lock = threading.Lock()


def _count_fork() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_count_fork)


class _FileValue:
    """One of prometheus_client's multiprocess values, written straight into its place in this process's file."""

    __slots__ = ("_value", "_forks", "_file", "_position")

    def __init__(self, value: Any) -> None:
        self._value = value
        self._bind()

    def _bind(self) -> None:
        value = self._value
        # get() has prometheus_client move every value of a forked process to files of the child's own.
        value.get()
        self._forks = _forks
        self._file = value._file
        # A value keeps its place in the file (a file that grows is mapped again, whole, as _m).
        self._position = value._file._positions[value._key]

    def inc(self, amount: float) -> None:
        with _lock:
            if self._forks != _forks:
                self._bind()
            value = self._value
            value._value += amount
            _write_value(self._file._m, self._position, value._value, 0.0)


def _inc(value: Any) -> Callable[[float], None]:
    """``value.inc``, for one of prometheus_client's values: straight into the file in multiprocess mode."""
    return _FileValue(value).inc if value._multiprocess else value.inc


def adder(counter: Counter) -> Callable[[float], None]:
    """What ``counter.inc`` does (a counter without labels, or a child), for amounts never negative."""
    return _inc(counter._value)


def observer(histogram: Histogram) -> Callable[[float], None]:
    """What ``histogram.observe`` does (a histogram without labels, or a child)."""
    add_to_sum = _inc(histogram._sum)
    bounds = histogram._upper_bounds  # ends with +Inf: every amount has its bucket
    buckets = [_inc(bucket) for bucket in histogram._buckets]

    def observe(amount: float) -> None:
        add_to_sum(amount)
        buckets[bisect_left(bounds, amount)](1)

    return observe


def is_too_large(raw: Any, errors: Any) -> bool:
    """Whether a rejected event was refused for its size alone (or its depth), rather than for what it holds.

    An event object's only whole-event (``_schema``) error is the size check's:
    the schema checks the size only once every field is valid, and redaction's
    second size check reports there too. A non-object event's error is there as
    well ("Invalid input type"), hence the type check.
    """
    return isinstance(raw, dict) and isinstance(errors, dict) and list(errors) == ["_schema"]


class TimedSink:
    """A sink whose writes are timed and whose failures are counted; otherwise the sink itself."""

    def __init__(self, sink: Sink, seconds: Callable[[float], None], failures: Callable[[float], None]) -> None:
        self.sink = sink
        self.name = sink.name
        self._seconds = seconds
        self._failures = failures

    def write(self, batch: Batch) -> None:
        started = time.perf_counter()
        try:
            self.sink.write(batch)
        except BaseException:
            self._failures(1)
            raise
        finally:
            self._seconds(time.perf_counter() - started)

    def unready_reason(self) -> str | None:
        return self.sink.unready_reason()


def events_dropped(reason: str, count: int = 1) -> None:
    """Count ``count`` events of the current request dropped for ``reason`` (one of DROP_REASONS) when METRICS is on."""
    metrics: Metrics | None = current_app.extensions.get("metrics")
    if metrics is not None and count:
        metrics.dropped[reason](count)


def worker_started(app: Flask) -> None:
    """Count this process as a serving worker in ``analytics_workers``; for gunicorn's post_worker_init."""
    metrics: Metrics | None = app.extensions.get("metrics")
    if metrics is not None:
        metrics.workers.inc()


def allowed_networks(entries: Iterable[str]) -> Callable[[str | None], bool]:
    """A test of a client address against METRICS_ALLOW's networks (checked by config.check_settings)."""
    networks = tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)

    def allowed(client_ip: str | None) -> bool:
        if client_ip is None:
            return False
        ip = ipaddress.ip_address(client_ip)
        return any(ip in network for network in networks)

    return allowed


def register_metrics(app: Flask) -> None:
    """Count every request and serve GET /metrics to METRICS_ALLOW, if METRICS is on; else nothing at all."""
    if not app.config["METRICS"]:
        return
    app.extensions["metrics"] = metrics = Metrics(multiprocess_mode())
    allowed = allowed_networks(app.config["METRICS_ALLOW"])
    app.wsgi_app = counted(app.wsgi_app, metrics, app)  # type: ignore[method-assign]

    # Every method routed here, none answered by Flask itself: to a client outside METRICS_ALLOW an OPTIONS or a
    # PUT must be the 404 of an unknown path too, not an answer whose Allow header says the page exists.
    @app.route("/metrics", endpoint="metrics", methods=EVERY_METHOD, provide_automatic_options=False)
    def serve_metrics() -> Response:
        """The metrics in Prometheus' text format, for METRICS_ALLOW; to anyone else the 404 of an unknown path."""
        client_ip = g.sender.client_ip
        if not allowed(client_ip):
            # The refused client learns nothing; the operator whose scrape fails finds why here.
            log.info("metrics_refused", client_ip=client_ip, hint="not within METRICS_ALLOW")
            raise ApiError(404, messages.NOT_FOUND)
        if request.method not in SCRAPE_METHODS:
            raise MethodNotAllowed(valid_methods=SCRAPE_METHODS)
        return Response(metrics.exposition(), content_type=CONTENT_TYPE_LATEST)


def counted(wsgi_app: Callable, metrics: Metrics, app: Flask) -> Callable:
    """``wsgi_app`` with every request timed and counted by path and status.

    Around the app rather than in request hooks: the clock starts before any hook
    can refuse the request, and Flask's hooks cost a request more (each is checked
    for a coroutine on every call). The path label is one of the app's routes, or
    "other": what a client puts in its request line never becomes a label value.
    """
    paths: set[str] = set()

    def counted_wsgi_app(environ: dict, start_response: Callable) -> Any:
        started = time.perf_counter()
        statuses = []

        def start(status: str, headers: list, exc_info: Any = None) -> Any:
            statuses.append(status)
            return start_response(status, headers, exc_info)

        answer = wsgi_app(environ, start)
        if not paths:
            # Only now are all the routes registered: the app was built after this was.
            paths.update(rule.rule for rule in app.url_map.iter_rules() if not rule.arguments)
        path = environ.get("PATH_INFO", "")
        metrics.answered(path if path in paths else OTHER_PATH, statuses[-1][:3], time.perf_counter() - started)
        return answer

    return counted_wsgi_app
