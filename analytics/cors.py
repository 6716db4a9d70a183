"""CORS for the API: which browser pages may POST events, and what they may read of the answer.

flask-cors did this first, and cost about 30 µs a request (6% of a ten-event
request, py-spy in bench/): it matches every path against its resource
patterns and recomputes its options on each response. The service needs four
rules, applied here with the settings read once: refuse origins not allowed,
answer preflights, name the allowed origin, expose our headers. No
credentials are ever allowed.

CORS_ORIGINS is an allowlist, enforced here rather than left to the browser: a
text/plain POST needs no preflight, so a page on any origin can send one, and
the browser only hides the answer afterwards. Such a request is refused with a
403 before its body is read, so nothing of it is written. Requests without an
Origin (servers, curl) are not a browser's and are let through.
"""

from collections.abc import Iterable

from flask import Flask, Response, request

from analytics import messages
from analytics.errors import ApiError

# Response headers a page may read besides the safelisted ones.
EXPOSED = "X-Request-ID, Retry-After"
# How long a browser may reuse a preflight's answer.
MAX_AGE = "86400"


def register_cors(app: Flask, origins: str | Iterable[str], prefix: str = "/api/") -> None:
    """Refuse, and add CORS headers for, browser requests under ``prefix`` per ``origins`` ("*" for any)."""
    any_origin = origins == "*"
    allowed = frozenset() if any_origin else frozenset(origins)

    if not any_origin:
        # Registered only for an allowlist: every hook costs each request a few microseconds.
        @app.before_request
        def refuse_other_origins() -> None:
            origin = request.environ.get("HTTP_ORIGIN")
            if origin is not None and origin not in allowed and request.path.startswith(prefix):
                raise ApiError(403, messages.ORIGIN_NOT_ALLOWED)

    @app.after_request
    def add_cors_headers(response: Response) -> Response:
        if request.method == "OPTIONS" and response.status_code == 200:
            # Flask's automatic answer is an empty text/html 200; a preflight has no body to type.
            response.status_code = 204
            del response.headers["Content-Type"]
        origin = request.environ.get("HTTP_ORIGIN")
        if origin is None or not request.path.startswith(prefix):
            return response
        if any_origin:
            response.headers["Access-Control-Allow-Origin"] = "*"
        elif origin in allowed:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.vary.add("Origin")
        else:
            # The 403 above: the browser may show the page's developer why, the page may not read it.
            response.vary.add("Origin")
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
