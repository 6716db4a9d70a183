"""Reading the request body: bounded on the wire, gunzipped, bounded again, parsed as JSON."""

import codecs
import socket
import struct
import time
import zlib
from functools import lru_cache
from typing import IO, Any

import orjson
from flask import Request
from gunicorn.http.errors import ParseException

from analytics import messages
from analytics.errors import ApiError

CHUNK_BYTES = 64 * 1024
# After a 413 this much more of the body is read and thrown away, so that the
# client, still sending, reads our answer instead of a reset connection; for at
# most this many seconds, so that a slow one gets the 413 well before gunicorn's
# worker timeout (30 s) would end the worker and answer its own HTML 500.
DRAIN_BYTES = 16 * 1024 * 1024
DRAIN_SECONDS = 5.0
# Content-Encoding values, as lower-cased; "x-gzip" is gzip's old name (RFC 9110).
GZIP = ("gzip", "x-gzip")
IDENTITY = ("identity", "")
# gzip's own header framing; 16 + MAX_WBITS tells zlib to expect it.
GZIP_WBITS = 16 + zlib.MAX_WBITS

# What the objects and arrays of a parsed body may cost in memory, estimated from its bytes before parsing:
# every object or array at least 64 bytes (an empty one), every key (a colon) up to 120 more (a dict's table).
# 1 MiB of nested one-key objects made 38 MiB of dicts, and a worker's peak passed 90 MiB; the budget leaves
# room for the 350,000 empty arrays (22 MB) of the costliest body that was within it.
CONTAINER_BYTES_BUDGET = 24 * 1024 * 1024
CONTAINER_BYTES = 64
KEY_BYTES = 120
# No body shorter than this can be over the budget (no byte adds more than a key's 120), so none is scanned.
SCANNED_FROM_BYTES = CONTAINER_BYTES_BUDGET // KEY_BYTES


def invalid_json() -> ApiError:
    """The 400 for a body that is not a complete JSON text."""
    return ApiError(400, messages.INVALID_JSON)


def too_large(limit: int) -> ApiError:
    """The 413 for a body over ``limit`` bytes."""
    return ApiError(413, messages.PAYLOAD_TOO_LARGE, limit_bytes=limit)


def _drain(stream: IO[bytes]) -> None:
    """Read and discard what is left of the body, up to DRAIN_BYTES or for DRAIN_SECONDS."""
    left = DRAIN_BYTES
    deadline = time.monotonic() + DRAIN_SECONDS
    try:
        while left > 0 and time.monotonic() < deadline and (chunk := stream.read(min(CHUNK_BYTES, left))):
            left -= len(chunk)
    except (OSError, ParseException):
        pass  # the rest of a body already refused is broken too: the 413 stands


def _read_bounded(stream: IO[bytes], limit: int) -> bytes:
    """The whole body, or a 413 as soon as it passes ``limit``: never more is kept."""
    chunks = []
    size = 0
    while chunk := stream.read(min(CHUNK_BYTES, limit + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            _drain(stream)
            raise too_large(limit)
    return b"".join(chunks)


def _gunzip(data: bytes, limit: int) -> bytes:
    """Decompress a gzip body, stopping with a 413 once the output passes ``limit``."""
    inflater = zlib.decompressobj(GZIP_WBITS)
    try:
        # max_length caps the output, so a bomb never inflates past the limit.
        out = inflater.decompress(data, limit + 1)
    except zlib.error as error:
        raise invalid_json() from error
    if len(out) > limit:
        raise too_large(limit)
    if not inflater.eof or inflater.unused_data:
        # Truncated stream, or bytes after its end.
        raise invalid_json()
    return out


@lru_cache(maxsize=4)
def _timeval(seconds: float) -> bytes:
    """``seconds`` as the struct timeval that SO_RCVTIMEO takes (one setting: built once)."""
    whole = int(seconds)
    return struct.pack("@ll", whole, int((seconds - whole) * 1_000_000))


def _bound_reads(environ: dict, seconds: float) -> None:
    """Bound each read of the body, where the server hands us its socket (gunicorn does).

    Without it a client that stops short of its Content-Length holds a sync
    worker until gunicorn kills it, and gets gunicorn's HTML 500. SO_RCVTIMEO
    costs one system call; socket.settimeout would cost four (and 17 µs a
    request, py-spy in bench/). It stays on the connection, which sync workers
    close after each request anyway.
    """
    sock = environ.get("gunicorn.socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))


def _read(request: Request, limit: int) -> bytes:
    """The raw body, or a 413 past ``limit``, or a 400 when it ends before its Content-Length."""
    stream = request.stream
    length = request.content_length
    if length is not None and length > limit:
        _drain(stream)
        raise too_large(limit)
    if length is None:
        return _read_bounded(stream, limit)
    # The server stops the stream at the Content-Length: one read takes it all.
    body = stream.read(length)
    if len(body) < length:
        # The client closed early: RFC 9112 calls such a message incomplete.
        raise invalid_json()
    return body


def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The body, decompressed, whatever the Content-Type says; raise ApiError if it cannot be had within limits."""
    environ = request.environ
    # The header as the WSGI environ holds it: what request.headers would look up, without building them.
    encoding = environ.get("HTTP_CONTENT_ENCODING", "identity").strip().lower()
    if encoding not in GZIP and encoding not in IDENTITY:
        raise ApiError(415, messages.UNSUPPORTED_ENCODING, supported=[*GZIP, "identity"])
    _bound_reads(environ, timeout)
    try:
        body = _read(request, limit)
    except (TimeoutError, BlockingIOError) as error:
        # A blocking socket past SO_RCVTIMEO fails with EAGAIN, which Python raises as BlockingIOError.
        raise ApiError(408, messages.REQUEST_TIMEOUT) from error
    except (OSError, ParseException) as error:
        # A malformed chunk, or the client gone mid-body: gunicorn raises these as the app reads.
        raise invalid_json() from error
    if encoding in GZIP:
        body = _gunzip(body, limit)
    return body


def parse_json(body: bytes) -> Any:
    """The body as JSON, or the 400 that says it is not (or the 413 of one that would take too much memory)."""
    if len(body) >= SCANNED_FROM_BYTES:
        # Brackets and colons inside strings count too: an estimate from above, three byte scans.
        containers = body.count(b"{") + body.count(b"[")
        if containers * CONTAINER_BYTES + body.count(b":") * KEY_BYTES > CONTAINER_BYTES_BUDGET:
            raise ApiError(413, messages.TOO_MANY_CONTAINERS)
    try:
        # RFC 8259 lets a parser ignore a byte order mark; orjson refuses one.
        return orjson.loads(body.removeprefix(codecs.BOM_UTF8))
    except orjson.JSONDecodeError as error:
        raise invalid_json() from error
