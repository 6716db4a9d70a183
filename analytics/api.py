"""The blueprint of the JSON API: ingestion and the health check."""

from flask import Blueprint, Response, current_app, g, request

from analytics import messages
from analytics.body import parse_json, read_body
from analytics.errors import ApiError
from analytics.ingest import Ingestor, collector_paused
from analytics.timestamps import utc_now

bp = Blueprint("api", __name__)


@bp.post("/api/analytics")
def ingest() -> dict:
    """Accept a batch: log its valid events, report the invalid ones."""
    received_at = utc_now()
    ingestor: Ingestor = current_app.extensions["ingestor"]
    config = current_app.config
    body = read_body(request, config["MAX_BODY_BYTES"], config["BODY_READ_TIMEOUT"])
    if ingestor.metrics:
        ingestor.metrics.body_bytes(len(body))
    # The parsed body lives only inside the pause: it is freed before the collector can run over it.
    with collector_paused(len(body)):
        return ingestor.ingest(parse_json(body), received_at, g.sender)


@bp.get("/api/tracking-plan")
def tracking_plan() -> Response:
    """The tracking plan in force, its modes, and each type's payload schema, rendered once at start."""
    return Response(current_app.extensions["tracking_plan"].document, mimetype="application/json")


@bp.get("/healthz")
def healthz() -> dict:
    """Liveness for load balancers and platforms."""
    return {"status": "ok"}


@bp.get("/readyz")
def readyz() -> dict:
    """Readiness for load balancers: whether the event log can take a batch now (a 503 says why not)."""
    reason = current_app.extensions["event_log"].unready_reason()
    if reason:
        raise ApiError(503, messages.NOT_READY, reason=reason)
    return {"status": "ready"}
