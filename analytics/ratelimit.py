"""Rate limits in the service: at most RATE_LIMIT batches per client address, with Flask-Limiter.

For platforms without nginx in front (Procfile deploys); behind nginx, deploy/nginx.conf's limit_req
does the same job before a request costs gunicorn anything. Off by default, and then nothing is
registered and nothing imported: no hook runs, no request pays for it. On, Flask-Limiter's hooks cost
each request a half to all of what a one-event batch costs without them (measured in docs/operating.md).

Only POST /api/analytics counts (not its CORS preflight, not /healthz, /readyz or the client script).
The client is the address resolved through TRUSTED_PROXIES (``g.sender``): behind a trusted proxy the
forwarded address, and a client claiming another one in X-Forwarded-For is not believed. A request
with no address at all (gunicorn bound to a unix socket) is not limited.

Fixed windows, Flask-Limiter's default and the cheapest (one counter per client): a client's window
starts at its first request and lasts the period; the limit's count fits in any one window, so across
the boundary of two a client can get up to twice the limit within one period.

RATE_LIMIT_STORAGE says where the counts live. memory:// keeps them in each worker: with W workers a
client gets up to W times the limit, and more again across instances. redis:// shares one count among
every worker of every instance. While redis cannot be reached (or takes longer than REDIS_TIMEOUT),
each worker counts in memory instead, as memory:// would, with one warning; Flask-Limiter tries redis
again after 1, 2, 4, 8, 16 and 32 seconds, and so on, and says when it is back. A client never gets a
500 for it: the service would rather let a few more batches in than refuse them all.
"""

import logging
import math
import threading
import time
from functools import partial
from typing import TYPE_CHECKING

from flask import Flask, Response, g, request

from analytics import api, messages
from analytics.errors import error_response

if TYPE_CHECKING:
    from flask_limiter import Limiter, RateLimitExceeded

# Seconds redis gets to accept a connection and to answer: past it, the worker counts in memory.
REDIS_TIMEOUT = 0.5
# The one endpoint limited: POST /api/analytics.
INGEST_ENDPOINT = f"{api.bp.name}.{api.ingest.__name__}"
# Before every key, so that services sharing one redis keep apart.
KEY_PREFIX = "analytics"


def register_rate_limit(app: Flask) -> None:
    """Limit POST /api/analytics per client address as RATE_LIMIT says; without a RATE_LIMIT, register nothing."""
    rate = app.config["RATE_LIMIT"]
    if rate is None:
        return
    # Imported here: without a limit the service never loads Flask-Limiter.
    from flask_limiter import Limiter, RateLimitExceeded

    storage = app.config["RATE_LIMIT_STORAGE"]
    shared = storage != "memory://"
    before = set(threading.enumerate())
    limiter = Limiter(
        client_address,
        app=app,
        storage_uri=storage,
        # A URL's own ?socket_timeout=... wins over these (redis-py reads it last).
        storage_options={"socket_connect_timeout": REDIS_TIMEOUT, "socket_timeout": REDIS_TIMEOUT} if shared else {},
        default_limits=[rate],
        default_limits_exempt_when=not_counted,
        strategy="fixed-window",
        in_memory_fallback_enabled=shared,
        key_prefix=KEY_PREFIX,
        # X-RateLimit-* on every answer would cost each request a second look at the count.
        headers_enabled=False,
    )
    # The limits library's memory storage starts a one-shot 10 ms timer thread as it is built. This may be
    # gunicorn's master, which forks the workers afterwards: leave no thread running.
    for thread in set(threading.enumerate()) - before:
        if isinstance(thread, threading.Timer):
            thread.join(1)
    app.register_error_handler(RateLimitExceeded, partial(too_many_requests, limiter))
    # Flask-Limiter logs every refused request at INFO: a flood would write a line for each.
    logging.getLogger("flask-limiter").addFilter(not_a_breach)
    app.extensions["rate_limiter"] = limiter


def client_address() -> str:
    """The key a client is counted under: its address, as resolved through TRUSTED_PROXIES."""
    return g.sender.client_ip


def not_counted() -> bool:
    """Whether the request is left alone: anything but a POST to the ingestion endpoint, and a request whose
    client address the server did not give (gunicorn on a unix socket)."""
    return request.endpoint != INGEST_ENDPOINT or request.method != "POST" or g.sender.client_ip is None


def too_many_requests(limiter: "Limiter", error: "RateLimitExceeded") -> Response:
    """The 429: the JSON error body, and Retry-After, the seconds until the client's window ends."""
    response = error_response(429, messages.TOO_MANY_REQUESTS)
    response.headers["Retry-After"] = str(retry_after(limiter))
    return response


def retry_after(limiter: "Limiter") -> int:
    """Seconds until the breached limit's window ends, rounded up and one more: redis gives a key's time to
    live in whole seconds, rounded either way. The whole period if the storage cannot say."""
    breached = limiter.current_limit
    assert breached is not None, "a 429 names the limit it breached"
    try:
        reset = breached.window.reset_time
    # Whatever the storage raises (redis gone between the count and this look), the answer stays a 429.
    except Exception:
        return breached.limit.get_expiry()
    return max(1, math.ceil(reset - time.time()) + 1)


def not_a_breach(record: logging.LogRecord) -> bool:
    """Keep Flask-Limiter's lines except its one per refused request (warnings about redis stay)."""
    return not (record.levelno <= logging.INFO and str(record.msg).startswith("ratelimit "))
