"""The contract end to end: real gunicorn with several workers, over HTTP, reading the real stdout."""

import gzip
import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

from config import Config
from tests.harness.lines import strict_json

# gunicorn runs with the default settings.
MAX_BODY, MAX_EVENTS = Config.MAX_BODY_BYTES, Config.MAX_EVENTS


def test_contract_over_http(start_server):
    """The main answers of the contract, from real gunicorn, with its stdout holding exactly the accepted events."""
    server = start_server(workers=2)
    batch = {
        "timestamp": "2024-05-20T14:32:00Z",
        "events": [
            {"type": "article_read", "id": "a1", "payload": {"slug": "nextjs-api-routes", "token": "t"}},
            {"type": "bookmark_added", "id": "a2", "unknown": 1},
        ],
    }
    cases = [
        ({"events": [{"type": "page_view", "id": "p1"}]}, {}, 200, {"success": True, "received": 1}),
        (
            batch,
            {"Content-Type": "text/plain;charset=UTF-8"},
            200,
            {
                "success": True,
                "received": 1,
                "rejected": [{"index": 1, "id": "a2", "errors": {"unknown": ["Unknown field."]}}],
            },
        ),
        (b"{oops", {}, 400, {"error": "Invalid JSON"}),
        ({"events": "no"}, {}, 400, {"error": "Invalid events"}),
        ({"events": [], "timestamp": "later"}, {}, 400, {"error": "Invalid timestamp"}),
        (b"x" * (MAX_BODY + 1), {}, 413, {"error": "Payload too large", "limit_bytes": MAX_BODY}),
        (
            {"events": [{"type": "a"}] * (MAX_EVENTS + 1)},
            {},
            413,
            {"error": "Too many events", "limit_events": MAX_EVENTS},
        ),
        (
            {"events": []},
            {"Content-Encoding": "br"},
            415,
            {"error": "Unsupported Content-Encoding", "supported": ["gzip", "x-gzip", "identity"]},
        ),
        (
            gzip.compress(b'{"events": [{"type": "zipped", "id": "z1"}]}'),
            {"Content-Encoding": "gzip"},
            200,
            {"success": True, "received": 1},
        ),
    ]
    for body, headers, status, expected in cases:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        got_status, got_headers, got_body = server.post("/api/analytics", data, headers)
        assert (got_status, got_body) == (status, expected), body
        assert got_headers["Content-Type"] == "application/json"
        assert got_headers["X-Request-ID"]
    # Read once gunicorn has exited: a line written by mistake for a refused batch would be there too.
    assert server.stop() == 0
    lines = server.lines()
    assert [(line["kind"], line["id"]) for line in lines] == [("event", "p1"), ("event", "a1"), ("event", "z1")]
    assert lines[1]["payload"] == {"slug": "nextjs-api-routes", "token": "[REDACTED]"}
    assert lines[1]["batch_timestamp"] == "2024-05-20T14:32:00Z"


def test_large_events_from_concurrent_clients_never_tear(start_server):
    """Lines of tens of KiB from several workers through one pipe: each parses, each acknowledged event once."""
    server = start_server(workers=4)
    acknowledged: list[str] = []
    lock = threading.Lock()

    def send(client: int) -> None:
        for request in range(6):
            # 3 events of 20 to 30 KiB: far past the 4096 bytes a pipe writes atomically.
            events = [
                {"type": "big", "id": uuid.uuid4().hex, "payload": {"blob": chr(65 + client) * (20000 + 5000 * n)}}
                for n in range(3)
            ]
            status, _, body = server.post("/api/analytics", json.dumps({"events": events}).encode())
            assert (status, body) == (200, {"success": True, "received": 3}), (client, request)
            with lock:
                acknowledged.extend(event["id"] for event in events)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(send, range(8)))
    assert server.stop() == 0
    lines = server.lines()
    ids = [line["id"] for line in lines]
    assert sorted(ids) == sorted(acknowledged)
    assert len(set(ids)) == len(ids) == 8 * 6 * 3
    for line in lines:
        blob = line["payload"]["blob"]
        assert blob == blob[0] * len(blob), "a line holds bytes of two events"


def test_only_json_on_both_streams(start_server):
    """stdout holds only event lines; stderr, gunicorn's own logs included, is JSON diagnostics."""
    server = start_server(workers=2)
    status, _, _ = server.post("/api/analytics", b'{"events": [{"type": "one"}]}')
    assert status == 200
    assert server.stop() == 0
    assert [line["kind"] for line in server.lines()] == ["event"]
    diagnostics = [strict_json(line) for line in server.stderr_path.read_bytes().splitlines()]
    assert diagnostics, "gunicorn logged nothing"
    assert {line["kind"] for line in diagnostics} == {"diagnostic"}
    messages = [line["event"] for line in diagnostics]
    assert any(message.startswith("Listening at:") for message in messages)
    assert "Shutting down: Master" in messages


def test_access_log_only_when_asked(start_server):
    """gunicorn's access log is off by default and, with --access-logfile, JSON on stderr with the request id."""
    quiet = start_server(workers=1)
    loud = start_server(workers=1, env={"GUNICORN_CMD_ARGS": "--access-logfile -"})
    for server in (quiet, loud):
        status, headers, _ = server.post("/api/analytics", b'{"events": []}')
        assert status == 200
        server.stop()
        diagnostics = [strict_json(line) for line in server.stderr_path.read_bytes().splitlines()]
        access = [line for line in diagnostics if line.get("logger") == "gunicorn.access"]
        if server is quiet:
            assert access == []
        else:
            posts = [line for line in access if '"POST /api/analytics HTTP/1.1" 200' in line["event"]]
            assert len(posts) == 1 and posts[0]["request_id"] == headers["X-Request-ID"]
        assert server.lines() == []
