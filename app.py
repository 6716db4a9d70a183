"""The application factory: a list of steps, each a small function below."""

import os
from collections.abc import Mapping
from typing import Any

import structlog
from flask import Flask, Response, g, request

from analytics import api, client, openapi
from analytics.allocator import return_large_buffers
from analytics.cors import register_cors
from analytics.errors import register_error_handlers
from analytics.eventlog import EventLog, Sink, StdoutSink
from analytics.ingest import Ingestor
from analytics.jetstream import JetStreamSink
from analytics.jsonprovider import OrjsonProvider
from analytics.kafka import KafkaSink
from analytics.lines import most_written
from analytics.logs import configure_logging
from analytics.metrics import register_metrics
from analytics.peers import Peers
from analytics.plan import plan_from_settings
from analytics.ratelimit import register_rate_limit
from analytics.stdout import LockedWriter, check_writable
from config import PREFIX, Config, check_settings, unknown_variables

STDOUT = 1

log = structlog.get_logger()


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the service; ``config`` overrides the defaults and the environment (tests use it)."""
    configure_logging()
    return_large_buffers()
    app = Flask(__name__)
    # A path with a doubled slash is an unknown path (a JSON 404), not werkzeug's HTML redirect to the merged one.
    app.url_map.merge_slashes = False
    app.json = OrjsonProvider(app)
    load_config(app, config)
    # Refused at start, not answered with a 500 on every batch while /healthz says ok. Checked before anything
    # opens a file: a stdout closed at exec leaves its number free, and the first file opened (the metrics'
    # own, say) would take it, and every event line after it.
    if "stdout" in app.config["SINKS"]:
        check_writable(STDOUT)
    register_request_ids(app)
    register_metrics(app)
    register_cors(app, app.config["CORS_ORIGINS"])
    register_rate_limit(app)
    register_extensions(app)
    app.register_blueprint(api.bp)
    app.register_blueprint(client.bp)
    app.register_blueprint(openapi.bp)
    register_error_handlers(app)
    return app


def load_config(app: Flask, config: Mapping[str, Any] | None) -> None:
    """Defaults from config.py, then ANALYTICS_* variables, then the caller's mapping; then checked."""
    app.config.from_object(Config)
    app.config.from_prefixed_env(PREFIX)
    if config:
        app.config.update(config)
    check_settings(app.config)
    for name in unknown_variables(os.environ):
        log.warning("unknown_setting", variable=name, hint="no setting has this name; see config.py")


def register_request_ids(app: Flask) -> None:
    """Say who sent each request, and give every answer its id; first, so that even a refusal carries it."""
    peers = Peers(app.config["TRUSTED_PROXIES"])

    @app.before_request
    def identify_request() -> None:
        g.sender = sender = peers.identify(request.environ)
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=sender.request_id)

    @app.after_request
    def finish_response(response: Response) -> Response:
        response.headers["X-Request-ID"] = g.sender.request_id
        # Unbound once the server is done with the response (after gunicorn's access line, which
        # carries the id), so that later lines of this worker never carry another request's id.
        response.call_on_close(structlog.contextvars.clear_contextvars)
        return response


def register_extensions(app: Flask, stdout: int = STDOUT) -> None:
    """The event log with the sinks SINKS names, and the ingestor, built once from the settings; ``stdout`` is the
    descriptor the stdout sink writes to."""
    sinks: list[Sink] = []
    # JetStream first and stdout last, whatever the order in SINKS: JetStream drops a retried event by its id
    # and stdout does not, so a batch whose stdout write failed (a 500) is retried without adding to the stream,
    # while the other order would write a batch's lines to stdout again after every JetStream failure (a 503).
    if "nats" in app.config["SINKS"]:
        # Only built here: this may be gunicorn's master, which forks the workers afterwards. Each worker
        # starts its own connection (gunicorn.conf.py's post_worker_init, else the first use).
        app.extensions["jetstream"] = jetstream = JetStreamSink.from_config(app.config)
        sinks.append(jetstream)
    if "kafka" in app.config["SINKS"]:
        # With the engines, before stdout (a retried batch adds records, but the ids dedup them downstream);
        # built only, like JetStream's: each worker creates its own producer (post_worker_init, else first use).
        app.extensions["kafka"] = kafka = KafkaSink.from_config(app.config)
        sinks.append(kafka)
    if "stdout" in app.config["SINKS"]:
        writer = LockedWriter(stdout, timeout=app.config["LOG_WRITE_TIMEOUT"])
        # Room for the most one request can make the service write, or not ready.
        min_free = most_written(app.config["MAX_BODY_BYTES"], app.config["MAX_EVENTS"])
        sinks.append(StdoutSink(writer, min_free=min_free))
    metrics = app.extensions.get("metrics")
    event_log = EventLog(metrics.timed(sinks) if metrics else sinks)
    app.extensions["event_log"] = event_log
    # The tracking plan is read and compiled here, once: a bad file stops the start (served by GET /api/tracking-plan).
    app.extensions["tracking_plan"] = plan = plan_from_settings(app.config)
    app.extensions["ingestor"] = Ingestor(app.config, event_log, metrics, plan=plan)
