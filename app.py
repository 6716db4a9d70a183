"""The application factory: a list of steps, each a small function below."""

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import structlog
from flask import Flask, Response, g, request

from analytics import api, client, openapi
from analytics.cors import register_cors
from analytics.errors import register_error_handlers
from analytics.eventlog import EventLog
from analytics.ingest import Ingestor
from analytics.jsonprovider import OrjsonProvider
from analytics.logs import configure_logging
from analytics.peers import Peers
from analytics.stdout import LockedWriter
from config import Config, check_settings

STDOUT = 1


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the service; ``config`` overrides the defaults and the environment (tests use it)."""
    configure_logging()
    app = Flask(__name__)
    app.json = OrjsonProvider(app)
    load_config(app, config)
    register_extensions(app)
    app.register_blueprint(api.bp)
    app.register_blueprint(client.bp)
    app.register_blueprint(openapi.bp)
    register_error_handlers(app)
    register_request_hooks(app)
    return app


def load_config(app: Flask, config: Mapping[str, Any] | None) -> None:
    """Defaults from config.py, then ANALYTICS_* variables, then the caller's mapping; then checked."""
    app.config.from_object(Config)
    app.config.from_prefixed_env("ANALYTICS")
    if config:
        app.config.update(config)
    check_settings(app.config)


def register_extensions(app: Flask) -> None:
    """The event log, the ingestor, trusted-proxy rules and CORS, built once from the settings."""
    writer = LockedWriter(STDOUT, timeout=app.config["LOG_WRITE_TIMEOUT"])
    app.extensions["analytics"] = Ingestor(app.config, EventLog(writer))
    app.extensions["peers"] = Peers(app.config["TRUSTED_PROXIES"])
    register_cors(app, app.config["CORS_ORIGINS"])


def register_request_hooks(app: Flask) -> None:
    """Give every request an id and a client address, and every response the id."""
    peers: Peers = app.extensions["peers"]
    log_client_ip = app.config["LOG_CLIENT_IP"]

    @app.before_request
    def identify_request() -> None:
        request_id, client_ip = peers.identify(request.environ)
        # What every event line of this request carries besides the event.
        context = {"received_at": datetime.now(UTC), "request_id": request_id}
        if log_client_ip:
            context["client_ip"] = client_ip
        g.event_context = context
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)

    @app.after_request
    def finish_response(response: Response) -> Response:
        response.headers["X-Request-ID"] = g.event_context["request_id"]
        if request.method == "OPTIONS" and response.status_code == 200:
            # Flask's automatic answer is an empty text/html 200; a preflight has no body to type.
            response.status_code = 204
            del response.headers["Content-Type"]
        return response
