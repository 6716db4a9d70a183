"""GET /analytics.js and GET /demo through the Flask test client: types, caching, versions, 304s."""

import base64
import gzip
import hashlib
import re

import pytest
from flask.testing import FlaskClient

from analytics.client import SCRIPT_PATH

SCRIPT = SCRIPT_PATH.read_bytes()
VERSION = hashlib.sha256(SCRIPT).hexdigest()[:16]
STABLE_CACHE = "public, max-age=86400, stale-while-revalidate=604800"
PINNED_CACHE = "public, max-age=31536000, immutable"


def test_script_is_javascript_with_a_content_etag(client: FlaskClient):
    """The stable URL serves the file as JavaScript, cached for a day, its ETag a hash of its content."""
    response = client.get("/analytics.js")
    assert response.status_code == 200
    assert response.content_type == "text/javascript; charset=utf-8"
    assert response.data == SCRIPT
    assert response.headers["ETag"] == f'"{VERSION}"'
    assert response.headers["Cache-Control"] == STABLE_CACHE
    assert response.headers["Vary"] == "Accept-Encoding"
    assert "Content-Encoding" not in response.headers
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert response.headers["Cross-Origin-Resource-Policy"] == "cross-origin"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Request-ID"]


@pytest.mark.parametrize(
    "if_none_match",
    [f'"{VERSION}"', f'W/"{VERSION}"', f'"other", "{VERSION}"', "*"],
)
def test_script_revalidates_to_304(client: FlaskClient, if_none_match: str):
    """A cached copy whose ETag still matches gets a 304 with no body and the caching headers again."""
    response = client.get("/analytics.js", headers={"If-None-Match": if_none_match})
    assert response.status_code == 304
    assert response.data == b""
    assert response.headers["ETag"] == f'"{VERSION}"'
    assert response.headers["Cache-Control"] == STABLE_CACHE
    assert response.headers["Vary"] == "Accept-Encoding"
    assert "Content-Type" not in response.headers


def test_script_changed_since_the_cached_copy_is_sent_whole(client: FlaskClient):
    """An ETag of an older script gets the current one, with its own ETag."""
    response = client.get("/analytics.js", headers={"If-None-Match": '"0123456789abcdef"'})
    assert response.status_code == 200
    assert response.data == SCRIPT
    assert response.headers["ETag"] == f'"{VERSION}"'


def test_pinned_version_is_immutable(client: FlaskClient):
    """?v= naming the current version is cached for a year, immutable."""
    response = client.get(f"/analytics.js?v={VERSION}")
    assert response.status_code == 200
    assert response.data == SCRIPT
    assert response.headers["Cache-Control"] == PINNED_CACHE
    assert response.headers["ETag"] == f'"{VERSION}"'
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert response.headers["Cross-Origin-Resource-Policy"] == "cross-origin"


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize(
    "version", ["0123456789abcdef", VERSION[:8], VERSION.upper(), ""], ids=["other", "prefix", "upper", "empty"]
)
def test_other_pinned_version_is_redirected_to_the_current_one(client: FlaskClient, method: str, version: str):
    """?v= naming any other version is a 302 to the current one, cached like the stable URL, loadable cross-origin."""
    response = client.open(
        f"/analytics.js?v={version}",
        method=method,
        headers={"If-None-Match": f'"{VERSION}"', "Accept-Encoding": "gzip"},
    )
    assert response.status_code == 302
    assert response.headers["Location"] == f"/analytics.js?v={VERSION}"
    assert response.headers["Cache-Control"] == STABLE_CACHE
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert response.headers["Cross-Origin-Resource-Policy"] == "cross-origin"
    assert "ETag" not in response.headers
    assert "Content-Encoding" not in response.headers
    followed = client.get(response.headers["Location"])
    assert followed.status_code == 200
    assert followed.data == SCRIPT
    assert followed.headers["Cache-Control"] == PINNED_CACHE


@pytest.mark.parametrize("accept_encoding", ["gzip", "gzip, deflate, br", "br;q=1.0, gzip;q=0.8", "*"])
def test_script_is_gzipped_when_accepted(client: FlaskClient, accept_encoding: str):
    """Clients that take gzip get it, under an ETag of its own; the content is the same file."""
    response = client.get("/analytics.js", headers={"Accept-Encoding": accept_encoding})
    assert response.status_code == 200
    assert response.headers["Content-Encoding"] == "gzip"
    assert response.content_type == "text/javascript; charset=utf-8"
    assert gzip.decompress(response.data) == SCRIPT
    assert response.headers["ETag"] == f'"{VERSION}-gzip"'
    assert response.headers["Vary"] == "Accept-Encoding"
    revalidated = client.get(
        "/analytics.js", headers={"Accept-Encoding": accept_encoding, "If-None-Match": f'"{VERSION}-gzip"'}
    )
    assert revalidated.status_code == 304
    assert revalidated.data == b""


@pytest.mark.parametrize("accept_encoding", ["identity", "gzip;q=0", "br", "deflate"])
def test_script_is_plain_unless_gzip_is_accepted(client: FlaskClient, accept_encoding: str):
    """gzip refused or not named: the plain file."""
    response = client.get("/analytics.js", headers={"Accept-Encoding": accept_encoding})
    assert response.status_code == 200
    assert "Content-Encoding" not in response.headers
    assert response.data == SCRIPT


def test_script_head_has_the_headers_and_no_body(client: FlaskClient):
    """HEAD answers like GET without the body."""
    response = client.head("/analytics.js")
    assert response.status_code == 200
    assert response.data == b""
    assert response.headers["ETag"] == f'"{VERSION}"'
    assert response.headers["Content-Length"] == str(len(SCRIPT))


@pytest.mark.parametrize("path", ["/analytics.js", "/demo"])
def test_client_routes_refuse_post_with_json(client: FlaskClient, path: str):
    """Other methods are the usual JSON 405 with Allow."""
    response = client.post(path, data=b"{}")
    assert response.status_code == 405
    assert response.is_json
    assert response.get_json() == {"error": "Method not allowed"}
    assert set(response.headers["Allow"].split(", ")) == {"GET", "HEAD", "OPTIONS"}


def test_script_is_no_static_file_server(client: FlaskClient):
    """Nothing else under the package's static folder is reachable."""
    for path in ["/static/analytics.js", "/analytics.js/", "/static/../client.py", "/analytics.min.js"]:
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.get_json() == {"error": "Not found"}


def test_demo_page_loads_the_client(client: FlaskClient):
    """/demo is an HTML page: one tag loads the client, buttons track events, the install snippet shows."""
    response = client.get("/demo")
    assert response.status_code == 200
    assert response.content_type == "text/html; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    html = response.get_data(as_text=True)
    assert re.findall(r"<script src=\"([^\"]+)\"", html) == ["/analytics.js"]
    assert len(re.findall(r'<button id="[a-z-]+" onclick="demoTrack\(', html)) >= 3
    assert f"http://localhost/analytics.js?v={VERSION}" in html
    integrity = "sha384-" + base64.b64encode(hashlib.sha384(SCRIPT).digest()).decode()
    assert f'integrity="{integrity}"' in html
