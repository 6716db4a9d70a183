"""The floor: what Python, WSGI and gunicorn cost for this route with no checking at all.

The same work as the seed document's Next.js route and nothing more: parse the
body with orjson, check that ``events`` is an array, render each event as one
``orjson.dumps`` line, write the batch with one ``os.write`` to fd 1, answer
``{"success": true, "received": N}``. Served by gunicorn, sync worker, one
worker, so that it costs exactly what the service's stack costs per request.

Run by bench/run.py as ``python bench/floor.py --bind 127.0.0.1:PORT``.
"""

import argparse
import os
from typing import Any

import orjson
from flask import Flask, Response, request
from gunicorn.app.base import BaseApplication

STDOUT = 1

app = Flask(__name__)


def _json(body: Any, status: int = 200) -> Response:
    """A JSON response rendered by orjson, as the service renders its own."""
    return Response(orjson.dumps(body), status=status, mimetype="application/json")


@app.post("/api/analytics")
def ingest() -> Response:
    """Print every event of an array, one line each, and count them."""
    try:
        body = orjson.loads(request.get_data())
    except orjson.JSONDecodeError:
        return _json({"error": "Failed to process events"}, 500)
    events = body.get("events") if isinstance(body, dict) else None
    if not isinstance(events, list):
        return _json({"error": "Invalid events"}, 400)
    os.write(STDOUT, b"".join([orjson.dumps(event) + b"\n" for event in events]))
    return _json({"success": True, "received": len(events)})


@app.get("/healthz")
def healthz() -> Response:
    """Liveness, so the harness knows when the floor is up."""
    return _json({"status": "ok"})


class FloorServer(BaseApplication):
    """gunicorn with explicit settings: one sync worker, and no gunicorn.conf.py from the working directory."""

    def __init__(self, bind: str) -> None:
        self.options = {"bind": bind, "workers": 1, "worker_class": "sync", "control_socket_disable": True}
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        return app


def main() -> None:
    """Serve the floor on ``--bind``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1:8001")
    FloorServer(parser.parse_args().bind).run()


if __name__ == "__main__":
    main()
