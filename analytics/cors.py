"""CORS for the API: browsers on other origins may POST events and read the answer.

flask-cors did this first, and cost about 30 µs a request (6% of a ten-event
request, py-spy in bench/): it matches every path against its resource
patterns and recomputes its options on each response. The service needs three
rules, applied here with the settings read once: answer preflights, name the
allowed origin, expose our headers. No credentials are ever allowed.
"""

from collections.abc import Iterable

from flask import Flask, Response, request

# Response headers a page may read besides the safelisted ones.
EXPOSED = "X-Request-ID, Retry-After"
# How long a browser may reuse a preflight's answer.
MAX_AGE = "86400"


def register_cors(app: Flask, origins: str | Iterable[str], prefix: str = "/api/") -> None:
    """Add CORS headers to the responses under ``prefix`` for requests from ``origins`` ("*" for any)."""
    any_origin = origins == "*"
    allowed = frozenset() if any_origin else frozenset(origins)

    @app.after_request
    def add_cors_headers(response: Response) -> Response:
        origin = request.environ.get("HTTP_ORIGIN")
        if origin is None or not request.path.startswith(prefix):
            return response
        if any_origin:
            response.headers["Access-Control-Allow-Origin"] = "*"
        elif origin in allowed:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.vary.add("Origin")
        else:
            return response
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            response.headers["Access-Control-Allow-Methods"] = ", ".join(sorted(response.allow)) or "POST"
            requested = request.headers.get("Access-Control-Request-Headers")
            if requested:
                response.headers["Access-Control-Allow-Headers"] = requested
            response.headers["Access-Control-Max-Age"] = MAX_AGE
        else:
            response.headers["Access-Control-Expose-Headers"] = EXPOSED
        return response
