"""The nasty cases by name: each answered as the contract says, every accepted event one strict-JSON line.

Bodies go through the Flask test client; what only a real server can show (a chunked body that never
ends, a Content-Length that lies, a gzip bomb on the wire) goes to real gunicorn over a raw socket.
"""

import codecs
import gzip
import json
import select
import socket
import struct
import time
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import pytest
from flask.testing import FlaskClient

from config import Config
from tests.harness.clients import parse_response, read_until_closed
from tests.harness.gunicorn import Server
from tests.harness.lines import parse_lines, strict_json

MiB = 1024 * 1024
DEFAULT_LIMIT = Config.MAX_BODY_BYTES


def deep(levels: int) -> bytes:
    """A JSON array nested ``levels`` deep."""
    return b"[" * levels + b"]" * levels


def batch(*events: bytes, extra: bytes = b"") -> bytes:
    """A batch whose events are the given raw JSON texts."""
    return b'{"events":[' + b",".join(events) + b"]" + extra + b"}"


def ingest(client: FlaskClient, capfd: pytest.CaptureFixture[bytes], body: bytes, **kwargs: Any):
    """POST ``body``; return the status, the JSON answer and the event lines written."""
    capfd.readouterr()
    response = client.post("/api/analytics", data=body, **kwargs)
    assert response.mimetype == "application/json"
    return response.status_code, strict_json(response.data), parse_lines(capfd.readouterr().out)


INVALID_JSON = (400, {"error": "Invalid JSON"})
TOO_DEEP = {"_schema": ["Event is nested too deeply to log."]}
ALL_CONTROLS = "".join(map(chr, range(32))) + "\x7f\u2028\u2029\x85"

# (id, body, expected status, expected answer, expected (type, payload) of each line written)
CASES: list[tuple[str, bytes, int, dict[str, Any], list[tuple[str, Any]]]] = [
    # Deep nesting: the parser stops at 1024 levels, the log writer at 254; neither is a 5xx.
    ("nesting-5000-in-payload", batch(b'{"type":"a","payload":{"x":' + deep(5000) + b"}}"), *INVALID_JSON, []),
    ("nesting-5000-in-ignored-key", batch(b'{"type":"a"}', extra=b',"x":' + deep(5000)), *INVALID_JSON, []),
    ("nesting-5000-as-the-body", deep(5000), *INVALID_JSON, []),
    (
        "nesting-1000-beside-a-valid-event",
        batch(b'{"type":"a","payload":{"x":' + deep(1000) + b"}}", b'{"type":"b"}'),
        200,
        {"success": True, "received": 1, "rejected": [{"index": 0, "errors": TOO_DEEP}]},
        [("b", None)],
    ),
    (
        "nesting-1000-alone",
        batch(b'{"type":"a","payload":' + b'{"a":' * 1000 + b"1" + b"}" * 1000 + b"}"),
        400,
        {"error": "Invalid events", "rejected": [{"index": 0, "errors": TOO_DEEP}]},
        [],
    ),
    (
        "nesting-1000-as-type",
        batch(b'{"type":' + deep(1000) + b"}"),
        400,
        {"error": "Invalid events", "rejected": [{"index": 0, "errors": {"type": ["Not a valid string."]}}]},
        [],
    ),
    (
        "nesting-1000-as-timestamp",
        batch(b'{"type":"a"}', extra=b',"timestamp":' + deep(1000)),
        400,
        {"error": "Invalid timestamp"},
        [],
    ),
    (
        "nesting-200-is-logged-whole",
        batch(b'{"type":"a","payload":{"x":' + deep(200) + b"}}"),
        200,
        {"success": True, "received": 1},
        [("a", {"x": json.loads(deep(200))})],
    ),
    # Numbers: 64-bit integers are kept exactly; beyond them orjson reads a double (see the README);
    # 1e400 is no finite number, so not JSON we accept, like NaN.
    (
        "uint64-max-exact",
        batch(b'{"type":"a","payload":{"n":18446744073709551615,"m":-9223372036854775808}}'),
        200,
        {"success": True, "received": 1},
        [("a", {"n": 2**64 - 1, "m": -(2**63)})],
    ),
    (
        "beyond-64-bits-as-double",
        batch(b'{"type":"a","payload":{"n":18446744073709551616,"m":%d}}' % -(2**100)),
        200,
        {"success": True, "received": 1},
        [("a", {"n": float(2**64), "m": float(-(2**100))})],
    ),
    ("1e400-in-payload", batch(b'{"type":"a","payload":{"n":1e400}}'), *INVALID_JSON, []),
    ("minus-1e400-in-payload", batch(b'{"type":"a","payload":{"n":-1e400}}'), *INVALID_JSON, []),
    ("1e400-as-timestamp", batch(b'{"type":"a"}', extra=b',"timestamp":1e400'), *INVALID_JSON, []),
    (
        "1e308-is-fine",
        batch(b'{"type":"a","payload":{"n":1e308,"tiny":1e-400}}'),
        200,
        {"success": True, "received": 1},
        [("a", {"n": 1e308, "tiny": 0.0})],
    ),
    # Surrogates: a lone one escaped or encoded is refused whole; a proper pair is one character.
    ("lone-high-surrogate-in-type", batch(b'{"type":"\\ud800"}'), *INVALID_JSON, []),
    ("lone-low-surrogate-in-payload", batch(b'{"type":"a","payload":{"k":"x\\udc00"}}'), *INVALID_JSON, []),
    ("surrogate-as-raw-bytes", batch(b'{"type":"\xed\xa0\x80"}'), *INVALID_JSON, []),
    (
        "surrogate-pair-escaped",
        batch(b'{"type":"\\ud83d\\ude00"}'),
        200,
        {"success": True, "received": 1},
        [("\U0001f600", None)],
    ),
    # NUL: escaped it is a character like any other; raw inside a string it is not JSON.
    (
        "nul-escaped",
        batch(b'{"type":"a\\u0000b","payload":{"k\\u0000":"v\\u0000"}}'),
        200,
        {"success": True, "received": 1},
        [("a\x00b", {"k\x00": "v\x00"})],
    ),
    ("nul-raw", batch(b'{"type":"a\x00b"}'), *INVALID_JSON, []),
    # A UTF-8 byte order mark: one is allowed (RFC 8259 lets parsers ignore it), two are not JSON.
    ("utf8-bom", codecs.BOM_UTF8 + batch(b'{"type":"a"}'), 200, {"success": True, "received": 1}, [("a", None)]),
    ("utf8-bom-twice", codecs.BOM_UTF8 * 2 + batch(b'{"type":"a"}'), *INVALID_JSON, []),
    ("utf16-bom", codecs.BOM_UTF16_LE + batch(b'{"type":"a"}').decode().encode("utf-16-le"), *INVALID_JSON, []),
    # Duplicate keys: the last one wins, at every level (orjson's rule, as most parsers').
    ("duplicate-type", batch(b'{"type":"a","type":"b"}'), 200, {"success": True, "received": 1}, [("b", None)]),
    (
        "duplicate-events",
        b'{"events":[{"type":"a"}],"events":[{"type":"b"},{"type":"c"}]}',
        200,
        {"success": True, "received": 2},
        [("b", None), ("c", None)],
    ),
    (
        "duplicate-secret-key",
        batch(b'{"type":"a","payload":{"password":"x","password":"y"}}'),
        200,
        {"success": True, "received": 1},
        [("a", {"password": "[REDACTED]"})],
    ),
    # Every control character, DEL and the Unicode line breaks, raw (as UTF-8) in type and payload.
    (
        "controls-and-line-breaks-raw",
        json.dumps(
            {
                "events": [
                    {"type": "t\t\u2028\u2029\x85\x7f", "payload": {"k\u2028": "v\u2029\x85"}},
                    {"type": "second"},
                ]
            },
            ensure_ascii=False,
        ).encode(),
        200,
        {"success": True, "received": 2},
        [("t\t\u2028\u2029\x85\x7f", {"k\u2028": "v\u2029\x85"}), ("second", None)],
    ),
    (
        "controls-escaped",
        json.dumps({"events": [{"type": ALL_CONTROLS, "payload": {ALL_CONTROLS: ALL_CONTROLS}}]}).encode(),
        200,
        {"success": True, "received": 1},
        [(ALL_CONTROLS, {ALL_CONTROLS: ALL_CONTROLS})],
    ),
    ("raw-newline-in-string", b'{"events":[{"type":"a\nb"}]}', *INVALID_JSON, []),
]


@pytest.mark.parametrize(("body", "status", "answer", "lines"), [pytest.param(*case[1:], id=case[0]) for case in CASES])
def test_nasty_body(client, capfdbinary, body, status, answer, lines):
    """Each nasty body gets its answer; what is accepted is written exactly, one strict-JSON line per event."""
    got_status, got_answer, written = ingest(client, capfdbinary, body)
    assert (got_status, got_answer) == (status, answer)
    assert [(line["type"], line.get("payload")) for line in written] == lines


def test_numbers_beyond_64_bits_are_written_as_strict_json(client, capfdbinary):
    """The doubles orjson reads for huge integers are written as plain JSON numbers, not Infinity."""
    body = batch(b'{"type":"a","payload":{"n":1%s}}' % (b"0" * 308))
    status, answer, written = ingest(client, capfdbinary, body)
    assert (status, answer) == (200, {"success": True, "received": 1})
    assert written[0]["payload"] == {"n": 1e308}


# --- gzip -----------------------------------------------------------------------------------------

_ZEROS = bytes(MiB)
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"


def gzip_of_zeros(mebibytes: int) -> bytes:
    """A valid gzip stream of ``mebibytes`` MiB of zeros, built without ever holding them.

    After a full flush deflate starts afresh, so each further MiB of zeros compresses to the same
    1037 bytes: the stream is that block repeated, an empty final block, and gzip's trailer.
    """
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = deflate.compress(_ZEROS) + deflate.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(mebibytes):
        crc = zlib.crc32(_ZEROS, crc)
    trailer = struct.pack("<II", crc, (mebibytes * MiB) & 0xFFFFFFFF)
    return _GZIP_HEADER + block * mebibytes + b"\x03\x00" + trailer


def gzip_bomb(wire_limit: int) -> tuple[bytes, int]:
    """The largest bomb of zeros that fits ``wire_limit`` bytes, and how many MiB it inflates to."""
    block_size = len(gzip_of_zeros(2)) - len(gzip_of_zeros(1))
    mebibytes = (wire_limit - len(gzip_of_zeros(0))) // block_size
    return gzip_of_zeros(mebibytes), mebibytes


def test_gzip_bomb_builder_makes_real_gzip():
    """The bomb builder's stream is real gzip: a small one inflates, CRC and length checked, to its zeros."""
    assert gzip.decompress(gzip_of_zeros(3)) == bytes(3 * MiB)


def test_gzip_bomb_is_stopped_at_the_limit(client, capfdbinary):
    """1 MiB on the wire that inflates to about 1 GiB: 413 after inflating just past the limit, never more."""
    bomb, mebibytes = gzip_bomb(DEFAULT_LIMIT)
    assert len(bomb) <= DEFAULT_LIMIT and mebibytes >= 1000
    tracemalloc.start()
    try:
        status, answer, written = ingest(client, capfdbinary, bomb, headers={"Content-Encoding": "gzip"})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (status, answer) == (413, {"error": "Payload too large", "limit_bytes": DEFAULT_LIMIT})
    assert written == []
    # The body, its copies and one limit's worth of output: megabytes, where inflating would take a gibibyte.
    assert peak < 16 * MiB


GZ = gzip.compress(batch(b'{"type":"a"}'))


@pytest.mark.parametrize(
    ("body", "status", "answer"),
    [
        pytest.param(GZ[:-8], *INVALID_JSON, id="truncated-before-trailer"),
        pytest.param(GZ[: len(GZ) // 2], *INVALID_JSON, id="truncated-mid-stream"),
        pytest.param(GZ[:10], *INVALID_JSON, id="header-only"),
        pytest.param(GZ[:-8] + b"\0\0\0\0" + GZ[-4:], *INVALID_JSON, id="bad-crc"),
        pytest.param(GZ + b"trailing", *INVALID_JSON, id="bytes-after-the-stream"),
        pytest.param(GZ + GZ, *INVALID_JSON, id="two-members"),
        pytest.param(batch(b'{"type":"a"}'), *INVALID_JSON, id="not-gzip-at-all"),
        pytest.param(b"", *INVALID_JSON, id="empty"),
        pytest.param(
            gzip.compress(codecs.BOM_UTF8 + batch(b'{"type":"a"}')),
            200,
            {"success": True, "received": 1},
            id="bom-inside-gzip",
        ),
    ],
)
def test_broken_gzip(client, capfdbinary, body, status, answer):
    """A truncated or corrupt gzip stream is a 400 Invalid JSON, never a 5xx, and writes nothing."""
    got_status, got_answer, written = ingest(client, capfdbinary, body, headers={"Content-Encoding": "gzip"})
    assert (got_status, got_answer) == (status, answer)
    assert len(written) == answer.get("received", 0)


# --- real gunicorn over a raw socket ----------------------------------------------------------------

# gunicorn's worker timeout, lowered from the production 30 s: a backstop above BODY_READ_TIMEOUT (1 s here),
# so that a case the service failed to end itself would still end soon, as a failure.
WORKER_TIMEOUT = 4


@pytest.fixture(scope="module")
def gunicorn(start_module_server: Callable[..., Server]) -> Server:
    """Real gunicorn with the production settings, but a short worker timeout."""
    env = {"GUNICORN_CMD_ARGS": f"--timeout {WORKER_TIMEOUT}", "ANALYTICS_BODY_READ_TIMEOUT": "1"}
    return start_module_server(workers=2, env=env)


def request_head(length_header: str) -> bytes:
    """The head of a POST to the ingestion route with the given length header."""
    return f"POST /api/analytics HTTP/1.1\r\nHost: 127.0.0.1\r\n{length_header}\r\n\r\n".encode()


def test_chunked_body_that_never_ends(gunicorn):
    """Chunks sent without end: the server answers 413 (having read at most the limit and a bounded drain)."""
    start = gunicorn.fence()
    chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
    sent = 0
    with socket.create_connection(("127.0.0.1", gunicorn.port), timeout=10) as sock:
        sock.sendall(request_head("Transfer-Encoding: chunked"))
        # Stop when the server has something to say, stops reading, or 64 MiB are out.
        while sent < 64 * MiB and not select.select([sock], [], [], 0)[0]:
            try:
                sock.sendall(chunk)
            except OSError:
                break
            sent += len(chunk)
        raw, closed = read_until_closed(sock, 10)
    status, headers, body = parse_response(raw)
    assert (status, strict_json(body)) == (413, {"error": "Payload too large", "limit_bytes": DEFAULT_LIMIT})
    assert headers["content-type"] == "application/json"
    assert closed and sent < 64 * MiB
    assert gunicorn.lines_since(start) == []


def test_gzip_bomb_on_the_wire(gunicorn):
    """The 1 MiB bomb through real gunicorn: 413, and the worker lives on to answer the next request."""
    start = gunicorn.fence()
    bomb, _ = gzip_bomb(DEFAULT_LIMIT)
    status, _, answer = gunicorn.post("/api/analytics", bomb, {"Content-Encoding": "gzip"})
    assert (status, answer) == (413, {"error": "Payload too large", "limit_bytes": DEFAULT_LIMIT})
    assert gunicorn.post("/api/analytics", batch(b'{"type":"after"}'))[::2] == (200, {"success": True, "received": 1})
    assert [line["type"] for line in gunicorn.lines_since(start)] == ["after"]


def test_content_length_shorter_than_the_body(gunicorn):
    """Content-Length says less than is sent: that many bytes are the body; the rest is never a request."""
    start = gunicorn.fence()
    body = batch(b'{"type":"short"}')
    smuggled = request_head("Content-Length: 30") + batch(b'{"type":"smuggled"}')
    with socket.create_connection(("127.0.0.1", gunicorn.port), timeout=10) as sock:
        sock.sendall(request_head(f"Content-Length: {len(body)}") + body + smuggled)
        raw, closed = read_until_closed(sock, 10)
    status, headers, answer = parse_response(raw)
    assert (status, strict_json(answer)) == (200, {"success": True, "received": 1})
    # Sync workers close after each response, so the bytes after the body are never read as a request.
    assert closed and headers["connection"] == "close" and raw.count(b"HTTP/1.1 ") == 1
    assert [line["type"] for line in gunicorn.lines_since(start)] == ["short"]


@pytest.fixture(scope="module")
def held_open(gunicorn: Server) -> tuple[bytes, bool, float]:
    """Content-Length 1000, 29 bytes sent, the connection held open: what comes back, and when."""
    body = batch(b'{"type":"held"}')
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", gunicorn.port), timeout=10) as sock:
        sock.sendall(request_head("Content-Length: 1000") + body)
        raw, closed = read_until_closed(sock, WORKER_TIMEOUT + 20)
    return raw, closed, time.monotonic() - started


def test_content_length_longer_held_open_does_not_hang(gunicorn, held_open):
    """The server ends the exchange by itself (BODY_READ_TIMEOUT's 408), and then serves requests again."""
    raw, closed, elapsed = held_open
    assert closed, f"no end after {elapsed:.1f} s"
    assert gunicorn.post("/api/analytics", batch(b'{"type":"after"}'))[::2] == (200, {"success": True, "received": 1})


def test_content_length_longer_held_open_is_a_408(held_open):
    """A client that stops sending is not a fault of ours: after BODY_READ_TIMEOUT it gets a JSON 408."""
    raw, _, _ = held_open
    status, headers, answer = parse_response(raw)
    assert (status, strict_json(answer)) == (408, {"error": "Request timeout"})
    assert headers["content-type"] == "application/json"


def test_content_length_longer_then_half_closed(gunicorn):
    """Content-Length 1000, 29 bytes, then the client's FIN: an incomplete body, so 400 and nothing written."""
    start = gunicorn.fence()
    with socket.create_connection(("127.0.0.1", gunicorn.port), timeout=10) as sock:
        sock.sendall(request_head("Content-Length: 1000") + batch(b'{"type":"cut"}'))
        sock.shutdown(socket.SHUT_WR)
        raw, closed = read_until_closed(sock, 10)
    status, _, answer = parse_response(raw)
    assert closed
    assert (status, strict_json(answer)) == INVALID_JSON
    assert gunicorn.lines_since(start) == []


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"zz\r\n{}\r\n0\r\n\r\n", id="bad-chunk-size"),
        pytest.param(b'5\r\n{"eve\r\n', id="client-gone-mid-chunked-body"),
        pytest.param(b'1e\r\n{"events": [{"type": "x"}]}XX0\r\n\r\n', id="chunk-missing-terminator"),
    ],
)
def test_broken_chunked_body_is_400(gunicorn, body):
    """A malformed chunked body, or one the client abandons, is the client's fault: a JSON 400, nothing written."""
    start = gunicorn.fence()
    with socket.create_connection(("127.0.0.1", gunicorn.port), timeout=10) as sock:
        sock.sendall(request_head("Transfer-Encoding: chunked") + body)
        sock.shutdown(socket.SHUT_WR)
        raw, closed = read_until_closed(sock, 10)
    status, headers, answer = parse_response(raw)
    assert closed
    assert (status, strict_json(answer)) == INVALID_JSON
    assert headers["content-type"] == "application/json"
    assert gunicorn.lines_since(start) == []
