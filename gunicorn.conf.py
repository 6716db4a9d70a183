"""gunicorn settings for every deployment: `gunicorn wsgi:app` picks this file up."""

import atexit
import os
import shutil
import sys
import tempfile
from typing import Any

from analytics.logs import gunicorn_logconfig
from analytics.stdout import StdoutNotWritableError
from config import SettingsError

# Platforms (Heroku and the like) say the port in $PORT; 8000 otherwise.
bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
# Platforms size this in $WEB_CONCURRENCY; two per core suits a CPU-bound sync app.
workers = int(os.environ.get("WEB_CONCURRENCY", 2 * (os.cpu_count() or 1)))
# Sync workers, measured against gthread (bench/run.py --service sync --service gthread:4):
# the same CPU per request with keep-alive, more without it or at 100 events (gthread's
# event loop and the GIL), and memory growing with threads. nginx in front buffers slow
# clients, which is what threads would otherwise be for. docs/operating.md, "Worker class".
worker_class = "sync"
# A request stuck longer than this (a blocked stdout, say) gets its worker replaced.
timeout = 30
# On SIGTERM, requests in flight get this long to finish; Heroku kills at 30 s.
graceful_timeout = 25
# gunicorn's own lines are JSON on stderr, like the service's diagnostics.
logconfig_dict = gunicorn_logconfig()
# ... and its access log only with --access-logfile (then JSON on stderr too).
logger_class = "analytics.logs.GunicornLogger"
# Memory-backed files, where the host has them, for the workers' metrics (metrics_parent).
SHM = "/dev/shm"
# gunicorn's control socket is not used here, and one per host clashes between instances.
control_socket_disable = True


def post_worker_init(worker: Any) -> None:
    """Start this worker's connections to NATS and Kafka (SINKS with nats, kafka) as soon as it has loaded the app.

    Here, after the fork, never in the master; and in the background: the boot
    does not wait for the engine, and the first request finds it connected.
    """
    for name in ("jetstream", "kafka"):
        sink = worker.wsgi.extensions.get(name)
        if sink:
            sink.start()
    # The bot rules and the user agent parser (BOTS, PARSE_USER_AGENT), built here, not in the master or on a request.
    worker.wsgi.extensions["ingestor"].enricher.build()
    from analytics.metrics import worker_started

    worker_started(worker.wsgi)


def worker_exit(server: object, worker: Any) -> None:
    """Close the worker's NATS connection and flush its Kafka producer (its last batch was answered already)."""
    app = getattr(worker, "wsgi", None)  # absent if the worker failed before loading the app
    for name in ("jetstream", "kafka"):
        sink = app.extensions.get(name) if app else None
        if sink:
            sink.close()


def on_starting(server: object) -> None:
    """Build the app once in the master before any worker: a bad setting or stdout is one clear line and exit 1.

    Otherwise every worker fails on its own, each with a traceback, and gunicorn
    ends with "Worker failed to boot", which buries the one line that matters.

    First, the workers' metrics directory (analytics/metrics.py): set before
    create_app imports prometheus_client, which chooses at import whether to keep
    values in files; new and empty at every start, so no file of an earlier run
    (say, one killed outright) adds to the counts. Removed as the master exits,
    however it does short of SIGKILL: also when it cannot bind, which ends
    gunicorn without its on_exit hook.
    """
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(
        prefix="analytics-metrics-", dir=metrics_parent()
    )
    atexit.register(remove_metrics_directory, os.getpid(), directory)
    from app import create_app

    try:
        create_app()
    except (SettingsError, StdoutNotWritableError) as error:
        sys.stderr.write(f"analytics: cannot start: {error}\n")
        sys.exit(1)


def metrics_parent() -> str | None:
    """Where the metrics directory goes: $TMPDIR if set, else /dev/shm (memory) if writable, else the default.

    Every request writes to the files there through shared memory maps; on a disk, writing back the pages now
    and then stalls a worker on its next write to them, which cost a sixth of the requests per second in the
    benchmark.
    """
    if os.environ.get("TMPDIR"):
        return None
    return SHM if os.access(SHM, os.W_OK | os.X_OK) else None


def child_exit(server: object, worker: Any) -> None:
    """In the master, once a worker has exited however it did: its gauges go, its counters stay in the sums."""
    from analytics.metrics import worker_gone

    worker_gone(worker.pid)


def remove_metrics_directory(master: int, directory: str) -> None:
    """Remove the workers' metrics directory, in the master only: forked workers inherit this exit handler."""
    if os.getpid() == master:
        shutil.rmtree(directory, ignore_errors=True)
