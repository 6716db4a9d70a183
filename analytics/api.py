"""The blueprint of the JSON API: ingestion and the health check."""

from flask import Blueprint, current_app, g, request

from analytics.body import read_json
from analytics.ingest import load_batch

bp = Blueprint("api", __name__)


@bp.post("/api/analytics")
def ingest() -> dict:
    """Accept a batch: log its valid events, report the invalid ones."""
    ingestor = current_app.extensions["analytics"]
    config = current_app.config
    events, batch_timestamp = load_batch(read_json(request, config["MAX_BODY_BYTES"], config["BODY_READ_TIMEOUT"]))
    accepted, rejected = ingestor.check(events)
    ingestor.write(accepted, batch_timestamp=batch_timestamp, **g.event_context)
    body = {"success": True, "received": len(accepted)}
    if rejected:
        body["rejected"] = rejected
    return body


@bp.get("/healthz")
def healthz() -> dict:
    """Liveness for load balancers and platforms."""
    return {"status": "ok"}
