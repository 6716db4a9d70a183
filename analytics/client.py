"""The browser client: ``GET /analytics.js`` and the ``GET /demo`` page, the service's only non-JSON responses.

Caching analytics.js. Sites install it with one tag naming a fixed URL, and a
new deployment must reach their visitors, so that URL cannot be cached for
good. Two URLs, one content:

- ``/analytics.js``: ``max-age`` a day, then ``stale-while-revalidate`` for a
  week, and an ``ETag`` made from a hash of the content; revalidation costs a
  304 with no body until the script changes. A changed script reaches every
  visitor within about a day of a deployment.
- ``/analytics.js?v=<version>``, where ``<version>`` is that same hash: cached
  for a year and ``immutable``, for sites that pin a version (and may add
  Subresource Integrity; the demo page shows the tag). Only the current
  version is served there: any other ``v`` is a 302 to the current one's URL.
  Serving the current script under an old ``v`` would put other content under
  a URL that caches keep for good, and under an integrity hash that no longer
  matches; with the redirect a tag without ``integrity`` follows to the current
  script, and one with it is blocked by the browser, visibly, until the site
  takes the new tag from the demo page. The redirect has the stable URL's
  caching (it changes at the next deployment), and the CORS headers below:
  a ``crossorigin`` script load follows a redirect only when it has them.

The script is served gzipped to clients that accept it (a proxy such as nginx
passes that through as it is), with ``Vary: Accept-Encoding`` and an ETag of
its own. It may be loaded from any origin: ``Access-Control-Allow-Origin: *``
lets a site use ``crossorigin`` (needed for Subresource Integrity), and
``Cross-Origin-Resource-Policy: cross-origin`` lets it load on sites that
isolate themselves with COEP.
"""

import base64
import gzip
import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from flask import Blueprint, Response, redirect, render_template, request, url_for

SCRIPT_PATH = Path(__file__).with_name("static") / "analytics.js"
# The stable URL: fresh for a day, then served stale for up to a week while it is revalidated.
STABLE_CACHE = "public, max-age=86400, stale-while-revalidate=604800"
# The versioned URL names one content for good.
PINNED_CACHE = "public, max-age=31536000, immutable"

bp = Blueprint("client", __name__, template_folder="templates")


def cross_origin(response: Response) -> Response:
    """Let pages on any origin load ``response``, with ``crossorigin`` and under COEP too."""
    response.headers["Access-Control-Allow-Origin"] = "*"
    response.headers["Cross-Origin-Resource-Policy"] = "cross-origin"
    return response


@dataclass(frozen=True)
class Script:
    """analytics.js as served: its bytes, gzipped too, its version and its integrity hash."""

    body: bytes
    gzipped: bytes
    version: str
    integrity: str


@cache
def script() -> Script:
    """The script, read and hashed once per process (a deployment ships a new one)."""
    body = SCRIPT_PATH.read_bytes()
    return Script(
        body=body,
        # mtime=0: the same script always gzips to the same bytes, in every worker.
        gzipped=gzip.compress(body, compresslevel=9, mtime=0),
        version=hashlib.sha256(body).hexdigest()[:16],
        integrity="sha384-" + base64.b64encode(hashlib.sha384(body).digest()).decode(),
    )


@bp.get("/analytics.js")
def analytics_js() -> Response:
    """The browser client, cached as the module docstring explains."""
    current = script()
    pinned = request.args.get("v")
    if pinned is not None and pinned != current.version:
        moved = redirect(url_for("client.analytics_js", v=current.version), 302)
        moved.headers["Cache-Control"] = STABLE_CACHE
        return cross_origin(moved)
    gzipped = request.accept_encodings["gzip"] > 0
    response = Response(current.gzipped if gzipped else current.body, mimetype="text/javascript")
    if gzipped:
        response.content_encoding = "gzip"
    response.vary.add("Accept-Encoding")
    # Each encoding is its own representation, so each has its own strong ETag.
    response.set_etag(current.version + ("-gzip" if gzipped else ""))
    response.headers["Cache-Control"] = PINNED_CACHE if pinned else STABLE_CACHE
    response.headers["X-Content-Type-Options"] = "nosniff"
    if request.if_none_match.contains_weak(response.get_etag()[0]):
        # werkzeug drops the body and the entity headers of a 304; ETag, caching and Vary stay.
        response.status_code = 304
    return cross_origin(response)


@bp.get("/demo")
def demo() -> Response:
    """A page that loads the client and tracks events from a few buttons, for a person to try it."""
    current = script()
    response = Response(
        render_template(
            "demo.html",
            script_url=url_for("client.analytics_js"),
            pinned_url=url_for("client.analytics_js", v=current.version, _external=True),
            integrity=current.integrity,
        ),
        mimetype="text/html",
    )
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
