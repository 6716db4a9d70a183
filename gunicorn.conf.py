"""gunicorn settings for every deployment: `gunicorn wsgi:app` picks this file up."""

import os
import sys
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
# gunicorn's control socket is not used here, and one per host clashes between instances.
control_socket_disable = True


def post_worker_init(worker: Any) -> None:
    """Start this worker's connection to NATS (SINKS with nats) as soon as it has loaded the app.

    Here, after the fork, never in the master; and in the background: the boot
    does not wait for the engine, and the first request finds it connected.
    """
    jetstream = worker.wsgi.extensions.get("jetstream")
    if jetstream:
        jetstream.start()


def worker_exit(server: object, worker: Any) -> None:
    """Close the worker's NATS connection cleanly (its last batch was answered, so acknowledged, already)."""
    app = getattr(worker, "wsgi", None)  # absent if the worker failed before loading the app
    jetstream = app.extensions.get("jetstream") if app else None
    if jetstream:
        jetstream.close()


def on_starting(server: object) -> None:
    """Build the app once in the master before any worker: a bad setting or stdout is one clear line and exit 1.

    Otherwise every worker fails on its own, each with a traceback, and gunicorn
    ends with "Worker failed to boot", which buries the one line that matters.
    """
    from app import create_app

    try:
        create_app()
    except (SettingsError, StdoutNotWritableError) as error:
        sys.stderr.write(f"analytics: cannot start: {error}\n")
        sys.exit(1)
