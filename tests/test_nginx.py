"""Behind a real nginx running deploy/nginx.conf: body limits, keep-alive after a 413, trusted headers, slow clients,
nginx's own answers as JSON."""

import gzip
import http.client
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import pytest

from tests.harness.clients import OUTSIDER, SlowUpload, connect, parse_response, read_until_closed, send
from tests.harness.gunicorn import Server, free_port, logged
from tests.harness.lines import strict_json
from tests.harness.nginx import Nginx, needs_nginx

LIMIT = 1024 * 1024
# Event lines with the client's whole address, not the default anonymized one.
FULL_ADDRESSES = {"ANALYTICS_CLIENT_IP": "full"}

pytestmark = needs_nginx


@pytest.fixture(scope="module")
def stack(
    start_module_server: Callable[..., Server], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Nginx]]:
    """gunicorn (2 workers, default settings but whole client addresses) behind nginx, shared by this module's tests.

    Whole addresses (CLIENT_IP full) tell nginx's own 127.0.0.1 from the client's 127.0.0.2, which the
    default anonymized addresses (127.0.0.0 both) would not; tests/test_enrich.py covers those behind nginx.
    """
    server = start_module_server(workers=2, env=FULL_ADDRESSES)
    nginx = Nginx(tmp_path_factory.mktemp("nginx"), server.port).start()
    yield server, nginx
    nginx.stop()


def request(
    connection: http.client.HTTPConnection, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, http.client.HTTPResponse, Any]:
    """POST /api/analytics on ``connection``; status, response (headers, will_close) and JSON body."""
    connection.request("POST", "/api/analytics", body, {"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    return response.status, response, json.loads(response.read())


def events_body(tag: str, count: int = 1, pad_to: int | None = None) -> bytes:
    """A valid batch of ``count`` events; with ``pad_to``, padded with JSON whitespace to exactly that many bytes."""
    body = orjson.dumps({"events": [{"type": "via_nginx", "id": f"{tag}-{n}"} for n in range(count)]})
    if pad_to is not None:
        assert len(body) <= pad_to
        body += b" " * (pad_to - len(body))
    return body


def wait_for_access(nginx: Nginx, timeout: float = 10, **match: str) -> dict[str, Any]:
    """nginx's one access log entry whose fields have the values in ``match`` (written once the response is sent)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entries = [entry for entry in nginx.access() if all(entry[key] == value for key, value in match.items())]
        if entries:
            assert len(entries) == 1
            return entries[0]
        time.sleep(0.02)
    raise AssertionError(f"no access log entry with {match}")


def chunked(body: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    """The body in pieces, which http.client sends with Transfer-Encoding: chunked."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


TOO_LARGE = {"error": "Payload too large", "limit_bytes": LIMIT}


@pytest.mark.parametrize(
    ("body", "chunks", "status", "expected", "answered_by"),
    [
        pytest.param(
            events_body("limit", 1000, LIMIT), False, 200, {"success": True, "received": 1000}, "200", id="at limit"
        ),
        pytest.param(
            events_body("chunked", 3, LIMIT), True, 200, {"success": True, "received": 3}, "200", id="at limit chunked"
        ),
        pytest.param(events_body("over", 1, LIMIT + 1), False, 413, TOO_LARGE, "413", id="limit+1"),
        pytest.param(events_body("overc", 1, LIMIT + 1), True, 413, TOO_LARGE, "413", id="limit+1 chunked"),
        pytest.param(events_body("huge", 1, 3 * LIMIT), False, 413, TOO_LARGE, "", id="past nginx's backstop"),
    ],
)
def test_body_limit_through_nginx(stack, body, chunks, status, expected, answered_by):
    """Bodies up to MAX_BODY_BYTES pass nginx whole; over it, a JSON 413: the service's, or nginx's past 2 MiB."""
    server, nginx = stack
    connection = connect(nginx.port)
    try:
        got_status, response, got_body = request(connection, chunked(body) if chunks else body)
    finally:
        connection.close()
    assert (got_status, got_body) == (status, expected)
    assert response.headers["Content-Type"] == "application/json"
    request_id = response.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    # upstream_status is the service's answer, or empty when nginx answered on its own.
    access = wait_for_access(nginx, request_id=request_id)
    assert (access["status"], access["upstream_status"]) == (status, answered_by)
    if status == 200:
        assert logged(server, json.loads(body)["events"][-1]["id"])["request_id"] == request_id


def test_keepalive_connection_serves_the_next_request_after_each_413(stack):
    """One client connection through nginx: each 413 (body too large, too many events) is followed by a 200 on it."""
    server, nginx = stack
    connection = connect(nginx.port)
    answers, sockets, closes, request_ids = [], [], [], []
    try:
        for body in [
            events_body("ka-over", pad_to=LIMIT + 1),
            events_body("ka-a"),
            orjson.dumps({"events": [{"type": "t"}] * 1001}),
            events_body("ka-b"),
            events_body("ka-over2", pad_to=LIMIT + 64 * 1024),
            events_body("ka-c"),
            # Small on the wire, over the limit once inflated.
            gzip.compress(events_body("ka-inflated", pad_to=LIMIT + 1)),
            events_body("ka-d"),
        ]:
            headers = {"Content-Encoding": "gzip"} if body[:2] == b"\x1f\x8b" else {}
            status, response, got = request(connection, body, headers)
            answers.append((status, got))
            closes.append(response.will_close)
            request_ids.append(response.headers["X-Request-ID"])
            sockets.append(connection.sock)
    finally:
        connection.close()
    ok = {"success": True, "received": 1}
    too_many = {"error": "Too many events", "limit_events": 1000}
    assert answers == [(413, TOO_LARGE), (200, ok), (413, too_many), (200, ok)] + [(413, TOO_LARGE), (200, ok)] * 2
    # http.client opens a new socket only when the last answer closed the connection.
    assert closes == [False] * 8
    assert len({id(sock) for sock in sockets}) == 1
    for event_id in ("ka-a-0", "ka-b-0", "ka-c-0", "ka-d-0"):
        logged(server, event_id)
    # nginx agrees: the requests were one connection's 1st to 8th.
    access = [wait_for_access(nginx, request_id=request_id) for request_id in request_ids]
    assert len({entry["connection"] for entry in access}) == 1
    assert [entry["connection_requests"] for entry in access] == list(range(1, 9))


@pytest.fixture(scope="module")
def untrusting(start_module_server: Callable[..., Server]) -> Server:
    """gunicorn that trusts no proxy at all (ANALYTICS_TRUSTED_PROXIES='[]')."""
    return start_module_server(workers=1, env={"ANALYTICS_TRUSTED_PROXIES": "[]", **FULL_ADDRESSES})


SPOOF = {"X-Request-ID": "chosen-by-client", "X-Forwarded-For": "203.0.113.9"}


def test_client_address_and_request_id_come_from_nginx(stack):
    """Through nginx, the event line carries the address nginx saw and nginx's request id, not what the client
    claimed in X-Forwarded-For and X-Request-ID; the response's X-Request-ID is that same id."""
    server, nginx = stack
    connection = connect(nginx.port, source=OUTSIDER)
    try:
        status, response, body = request(connection, events_body("peer"), SPOOF)
    finally:
        connection.close()
    assert (status, body) == (200, {"success": True, "received": 1})
    line = logged(server, "peer-0")
    request_id = response.headers["X-Request-ID"]
    assert (line["client_ip"], line["request_id"]) == (OUTSIDER, request_id)
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    access = wait_for_access(nginx, request_id=request_id)
    assert (access["remote_addr"], access["status"]) == (OUTSIDER, 200)


@pytest.mark.parametrize(
    ("which", "source", "believed"),
    [
        ("default settings", "127.0.0.1", True),
        ("default settings", OUTSIDER, False),
        ("TRUSTED_PROXIES=[]", "127.0.0.1", False),
    ],
)
def test_forwarded_headers_believed_from_trusted_proxies_only(stack, untrusting, which, source, believed):
    """Straight to gunicorn: X-Forwarded-For and X-Request-ID count only when the peer is in TRUSTED_PROXIES
    (127.0.0.1 and ::1 by default, as nginx is); from anyone else the peer's own address and a new id are logged."""
    server = stack[0] if which == "default settings" else untrusting
    tag = f"direct-{which[:3]}-{source}"
    connection = connect(server.port, source=source)
    try:
        status, response, body = request(connection, events_body(tag), SPOOF)
    finally:
        connection.close()
    assert (status, body) == (200, {"success": True, "received": 1})
    line = logged(server, f"{tag}-0")
    assert line["request_id"] == response.headers["X-Request-ID"]
    if believed:
        assert (line["client_ip"], line["request_id"]) == ("203.0.113.9", "chosen-by-client")
    else:
        assert line["client_ip"] == source
        assert line["request_id"] != "chosen-by-client"


SLOW_CLIENTS = 6
NORMAL_REQUESTS = 40


def test_slow_clients_do_not_stall_others(stack):
    """More clients than gunicorn has workers trickle their requests byte by byte through nginx; meanwhile other
    clients' requests all complete, and the slow ones too once they finish sending."""
    server, nginx = stack
    uploads = [
        SlowUpload(nginx.port, events_body(f"slow{n}", pad_to=2000), source=OUTSIDER) for n in range(SLOW_CLIENTS)
    ]
    headers_sent = threading.Barrier(SLOW_CLIENTS + 1, timeout=30)
    others_done = threading.Event()
    deadline = time.monotonic() + 20
    answers: list[Any] = [None] * SLOW_CLIENTS

    def trickle(index: int) -> None:
        upload = uploads[index]
        header_bytes = upload.data.index(b"\r\n\r\n") + 4
        while upload.sent < header_bytes:
            upload.send(1)
            time.sleep(0.01)
        headers_sent.wait()
        # One byte at a time, until the others are done (bounded, so that a stall fails instead of hanging).
        while not others_done.is_set() and time.monotonic() < deadline:
            upload.send(1)
            time.sleep(0.05)
        answers[index] = upload.finish()[::2]

    slow = [threading.Thread(target=trickle, args=(n,)) for n in range(SLOW_CLIENTS)]
    for thread in slow:
        thread.start()
    headers_sent.wait()
    with ThreadPoolExecutor(max_workers=4) as pool:
        others = list(pool.map(lambda n: send(nginx.port, events_body(f"fast{n}"))[::2], range(NORMAL_REQUESTS)))
    unfinished = [not upload.done for upload in uploads]
    others_done.set()
    for thread in slow:
        thread.join(30)

    assert others == [(200, {"success": True, "received": 1})] * NORMAL_REQUESTS
    assert unfinished == [True] * SLOW_CLIENTS, "the other requests waited for the slow ones"
    assert answers == [(200, {"success": True, "received": 1})] * SLOW_CLIENTS
    for n in range(SLOW_CLIENTS):
        assert logged(server, f"slow{n}-0")["client_ip"] == OUTSIDER


def test_backend_down_is_a_json_503(tmp_path):
    """With gunicorn not running, nginx answers 503 with a JSON body, Retry-After and a request id."""
    nginx = Nginx(tmp_path, free_port()).start()
    try:
        connection = connect(nginx.port)
        status, response, body = request(connection, events_body("down"))
        connection.close()
    finally:
        nginx.stop()
    assert (status, body) == (503, {"error": "Service unavailable"})
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Retry-After"] == "5"
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])


def head(request_line: bytes, *headers: bytes) -> bytes:
    """A request's head as sent on the wire: the request line, Host, Connection: close, then ``headers``."""
    return b"\r\n".join([request_line, b"Host: analytics.example.com", b"Connection: close", *headers, b"", b""])


def request_line(length: int) -> bytes:
    """A GET /healthz request line of exactly ``length`` bytes (its CRLF not counted), padded in the query."""
    line = b"GET /healthz?pad= HTTP/1.1"
    return line.replace(b"= ", b"=" + b"a" * (length - len(line)) + b" ")


def header_line(length: int) -> bytes:
    """A header line of exactly ``length`` bytes with its CRLF, written without a space after the colon."""
    return b"X-Pad:" + b"a" * (length - len(b"X-Pad:\r\n"))


def exchange(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` as it is on a new connection; the answer, read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        raw, closed = read_until_closed(sock, 30)
    assert closed, raw
    return parse_response(raw)


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        pytest.param(b"GARBAGE\r\n\r\n", 400, "Bad request", id="not a request line"),
        pytest.param(head(b"GET /healthz HTTP/1.1", b"No colon"), 400, "Bad request", id="header without a colon"),
        pytest.param(b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n", 400, "Bad request", id="no Host"),
        pytest.param(
            head(b"POST /api/analytics HTTP/1.1", b"Content-Length: 5", b"Transfer-Encoding: chunked") + b"0\r\n\r\n",
            400,
            "Bad request",
            id="Content-Length and chunked",
        ),
        pytest.param(
            head(b"POST /api/analytics HTTP/1.1", b"Transfer-Encoding: chunked") + b"zz\r\n",
            400,
            "Bad request",
            id="invalid chunk size",
        ),
        # The next three pass nginx's parser; deploy/nginx.conf stops them because gunicorn would not take them.
        pytest.param(head("GET /café HTTP/1.1".encode()), 400, "Bad request", id="raw UTF-8 in the target"),
        pytest.param(head(b"GET /a b HTTP/1.1"), 400, "Bad request", id="space in the target"),
        pytest.param(head(b"AB /healthz HTTP/1.1"), 400, "Bad request", id="two-letter method"),
        pytest.param(head(b"GET /_nginx/400 HTTP/1.1"), 404, "Not found", id="an error page asked for"),
        pytest.param(head(b"TRACE /healthz HTTP/1.1"), 405, "Method not allowed", id="TRACE"),
        pytest.param(head(request_line(9000)), 414, "URI too long", id="request line over nginx's buffer"),
        pytest.param(
            head(b"GET /healthz HTTP/1.1", header_line(9000)),
            431,
            "Request header fields too large",
            id="header line over nginx's buffer",
        ),
        pytest.param(
            head(b"POST /api/analytics HTTP/1.1", b"Transfer-Encoding: gzip"),
            501,
            "Not implemented",
            id="unknown Transfer-Encoding",
        ),
        pytest.param(head(b"GET /healthz HTTP/2.0"), 505, "HTTP version not supported", id="HTTP/2.0 request line"),
    ],
)
def test_nginx_answers_its_own_errors_in_json(stack, data, status, message):
    """Each error nginx answers itself, its HTML page otherwise, is JSON {"error": ...} with a request id."""
    _, nginx = stack
    got_status, headers, body = exchange(nginx.port, data)
    assert (got_status, strict_json(body)) == (status, {"error": message})
    assert headers["content-type"] == "application/json"
    request_id = headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    # Answered by nginx: the request never reached gunicorn.
    access = wait_for_access(nginx, request_id=request_id)
    assert (access["status"], access["upstream_status"]) == (status, "")


@pytest.mark.parametrize(
    ("data", "status", "body", "answered_by"),
    [
        pytest.param(head(request_line(4094)), 200, {"status": "ok"}, "200", id="request line of 4094 bytes"),
        pytest.param(head(request_line(4095)), 414, {"error": "URI too long"}, "", id="request line of 4095 bytes"),
        pytest.param(
            head(b"GET /healthz HTTP/1.1", header_line(8189)), 200, {"status": "ok"}, "200", id="header line of 8189"
        ),
        pytest.param(
            head(b"GET /healthz HTTP/1.1", header_line(8190)),
            431,
            {"error": "Request header fields too large"},
            "",
            id="header line of 8190",
        ),
    ],
)
def test_nginx_limits_stop_at_gunicorns(stack, data, status, body, answered_by):
    """gunicorn takes a request line of up to 4094 bytes and header lines of up to 8190 with their CRLF; nginx passes
    on a header line with a space after the colon, so it takes up to 8189. Past either, nginx answers in JSON, before
    gunicorn would in text/html."""
    _, nginx = stack
    got_status, headers, got = exchange(nginx.port, data)
    assert (got_status, strict_json(got)) == (status, body)
    assert headers["content-type"] == "application/json"
    access = wait_for_access(nginx, request_id=headers["x-request-id"])
    assert (access["status"], access["upstream_status"]) == (status, answered_by)


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        pytest.param([b"X-Note: a\x01b"], 400, id="control character in a header value"),
        pytest.param([b"X-Field-%d: 1" % n for n in range(100)], 431, id="more than 100 header fields"),
    ],
)
def test_what_nginx_cannot_check_gets_gunicorns_html(stack, extra, status):
    """The known edge docs/reliability.md states: nginx passes on what it cannot check, a control character in a
    header value or more than 100 header fields, and gunicorn answers with its own text/html page."""
    _, nginx = stack
    line = f"GET /healthz?edge={status} HTTP/1.1"
    got_status, headers, _ = exchange(nginx.port, head(line.encode(), *extra))
    assert got_status == status
    assert headers["content-type"].startswith("text/html")
    access = wait_for_access(nginx, request=line)
    assert access["upstream_status"] == str(status)


def test_worker_killed_at_its_timeout_is_gunicorns_html_500_through_nginx(tmp_path):
    """The known edge docs/reliability.md states: a worker gunicorn kills at its timeout answers with gunicorn's
    text/html 500, which nginx passes on like any answer of the service. Here gunicorn's timeout is 3 s and its
    stdout is left unread, so that a batch waits for room in the pipe until the worker is killed."""
    env = {"GUNICORN_CMD_ARGS": "--timeout 3", "ANALYTICS_LOG_WRITE_TIMEOUT": "60"}
    server = Server(tmp_path, workers=1, env=env).start()
    nginx = Nginx(tmp_path, server.port).start()
    answers = []
    try:
        server.pause_stdout()
        # Batches of about 900 KiB of event lines, until one finds the pipe full (it takes a few MiB at most).
        for n in range(4):
            events = [{"type": "stuck", "id": f"stuck-{n}-{i}", "payload": {"text": "x" * 30_000}} for i in range(30)]
            body = orjson.dumps({"events": events})
            line = f"POST /api/analytics?batch={n} HTTP/1.1"
            data = head(line.encode(), f"Content-Length: {len(body)}".encode()) + body
            status, headers, _ = exchange(nginx.port, data)
            answers.append((status, headers["content-type"]))
            if status != 200:
                break
    finally:
        server.resume_stdout()
        nginx.stop()
        server.stop()
    assert answers[:-1] == [(200, "application/json")] * (len(answers) - 1)
    assert answers[-1][0] == 500
    assert answers[-1][1].startswith("text/html")
    access = wait_for_access(nginx, request=line)
    assert (access["status"], access["upstream_status"]) == (500, "500")


def test_body_nginx_cannot_buffer_is_a_json_500(tmp_path):
    """A body nginx fails to write to a temporary file (one over client_body_buffer_size) gets a JSON 500."""
    nginx = Nginx(tmp_path, free_port()).start()
    try:
        # The folder of those temporary files, made a file: nginx cannot create one in it.
        temp = nginx.dir / "client_body"
        temp.rmdir()
        temp.touch()
        connection = connect(nginx.port)
        status, response, body = request(connection, events_body("unbuffered", pad_to=256 * 1024))
        connection.close()
    finally:
        nginx.stop()
    assert (status, body) == (500, {"error": "Internal server error"})
    assert response.headers["Content-Type"] == "application/json"
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])


def test_stalled_client_is_closed_without_an_answer(stack):
    """A client stalling past nginx's 10 s timeouts, in its headers or in its body, gets its connection closed with no
    answer at all, so no page to make JSON; nginx logs the request as a 408."""
    _, nginx = stack
    stalls = {
        "GET /healthz?stall=head HTTP/1.1": b"GET /healthz?stall=head HTTP/1.1\r\nHost: analytics.example.com\r\n",
        "POST /api/analytics?stall=body HTTP/1.1": (
            head(b"POST /api/analytics?stall=body HTTP/1.1", b"Content-Length: 100") + b'{"events": ['
        ),
    }

    def stall(data: bytes) -> tuple[bytes, bool]:
        with socket.create_connection(("127.0.0.1", nginx.port), timeout=30) as sock:
            sock.sendall(data)
            return read_until_closed(sock, 30)

    with ThreadPoolExecutor(max_workers=len(stalls)) as pool:
        answers = list(pool.map(stall, stalls.values()))
    assert answers == [(b"", True)] * len(stalls)
    for line in stalls:
        access = wait_for_access(nginx, request=line)
        assert (access["status"], access["upstream_status"]) == (408, "")
