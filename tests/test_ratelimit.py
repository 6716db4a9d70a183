"""Rate limits: RATE_LIMIT in the service (memory:// per worker, redis:// shared by every worker and instance, redis
gone), and deploy/nginx.conf's limit_req in front of it; every 429 JSON with Retry-After, and nothing written for it."""

import http.client
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import pytest

from app import create_app
from config import SettingsError
from tests.harness.gunicorn import ROOT, Server, refusal, run_gunicorn
from tests.harness.lines import strict_json
from tests.harness.nginx import Nginx, needs_nginx
from tests.harness.openapi import assert_matches, documented
from tests.harness.redis import REDIS_SERVER, RedisServer

TOO_MANY = {"error": "Too many requests"}
ACCEPTED = {"success": True, "received": 1}
# Client addresses of this host (Linux routes all of 127.0.0.0/8 to loopback) that the service does not trust as
# proxies: each is a client of its own. 127.0.0.1, a trusted proxy by default, is left to the harness's fences.
CLIENTS = [f"127.0.0.{n}" for n in range(2, 10)]

needs_redis = pytest.mark.skipif(
    not os.access(REDIS_SERVER, os.X_OK),
    reason=f"redis-server is not installed ({REDIS_SERVER}); apt-get install redis-server",
)


def batch(tag: str) -> bytes:
    """A one-event batch whose event id is ``tag``."""
    return orjson.dumps({"events": [{"type": "limited", "id": tag}]})


def post(port: int, body: bytes, source: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    """POST ``body`` to /api/analytics on loopback ``port`` from address ``source``, on a new connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    try:
        connection.request("POST", "/api/analytics", body, {"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, dict(response.headers), strict_json(response.read())
    finally:
        connection.close()


def assert_refused(status: int, headers: dict[str, str], body: Any, most_seconds: int) -> int:
    """A 429 as the contract has it: JSON, a request id, and Retry-After in whole seconds up to ``most_seconds``;
    returns Retry-After."""
    assert (status, body) == (429, TOO_MANY)
    assert headers["Content-Type"] == "application/json"
    assert len(headers["X-Request-ID"]) == 32
    retry_after = int(headers["Retry-After"])
    assert 1 <= retry_after <= most_seconds
    return retry_after


def event_ids(out: str) -> list[str]:
    """The event ids in stdout text captured from the app."""
    return [json.loads(line)["id"] for line in out.splitlines() if '"kind":"event"' in line]


# --- the app, through its test client ---------------------------------------------------------------------


@pytest.fixture
def limited() -> Any:
    """The app with RATE_LIMIT=3/hour (memory://)."""
    return create_app({"TESTING": True, "RATE_LIMIT": "3/hour"})


def test_each_client_address_gets_its_limit_then_json_429s_that_write_nothing(limited, capfd):
    """Three POSTs per address, whatever they answer (a 400 counts), then 429 with Retry-After (the rest of the hour,
    plus at most a second) and nothing written; another address is counted apart."""
    client = limited.test_client()
    first = client.post("/api/analytics", data=batch("a1"))
    bad = client.post("/api/analytics", data=b"{not json")
    second = client.post("/api/analytics", data=batch("a2"))
    refused = [client.post("/api/analytics", data=batch(f"a-refused-{n}")) for n in range(3)]
    other = client.post("/api/analytics", data=batch("b1"), environ_base={"REMOTE_ADDR": "192.0.2.7"})
    assert [(r.status_code, r.get_json()) for r in (first, bad, second, other)] == [
        (200, ACCEPTED),
        (400, {"error": "Invalid JSON"}),
        (200, ACCEPTED),
        (200, ACCEPTED),
    ]
    for response in refused:
        assert_refused(response.status_code, dict(response.headers), response.get_json(), 3601)
        assert int(response.headers["Retry-After"]) > 3500
    assert event_ids(capfd.readouterr().out) == ["a1", "a2", "b1"]


def test_only_posts_to_the_api_are_counted(limited, capfd):
    """Once an address has used its limit, its other requests are answered as ever: health, readiness, the client
    script, the OpenAPI document, a CORS preflight, a GET of the API (405)."""
    client = limited.test_client()
    for n in range(3):
        assert client.post("/api/analytics", data=batch(f"c{n}")).status_code == 200
    assert client.post("/api/analytics", data=batch("c-over")).status_code == 429
    preflight = {"Origin": "https://shop.example", "Access-Control-Request-Method": "POST"}
    answers = [
        client.get("/healthz").status_code,
        client.get("/readyz").status_code,
        client.get("/analytics.js").status_code,
        client.get("/api/openapi.json").status_code,
        client.options("/api/analytics", headers=preflight).status_code,
        client.get("/api/analytics").status_code,
    ]
    assert answers == [200, 200, 200, 200, 204, 405]
    assert client.post("/api/analytics", data=batch("c-still")).status_code == 429
    capfd.readouterr()


def test_the_client_is_the_address_resolved_through_trusted_proxies(limited, capfd):
    """Behind a trusted proxy each forwarded address has its own count; a peer that is not trusted is counted by its
    own address, whatever X-Forwarded-For it claims."""
    client = limited.test_client()

    def status(peer: str, forwarded: str) -> int:
        environ = {"REMOTE_ADDR": peer}
        return client.post(
            "/api/analytics", data=batch(uuid.uuid4().hex), environ_base=environ, headers={"X-Forwarded-For": forwarded}
        ).status_code

    via_proxy = [status("127.0.0.1", "203.0.113.1") for _ in range(4)] + [status("127.0.0.1", "203.0.113.2")]
    assert via_proxy == [200, 200, 200, 429, 200]
    spoofing = [status("198.51.100.9", f"203.0.113.{n}") for n in range(10, 14)]
    assert spoofing == [200, 200, 200, 429]
    capfd.readouterr()


def test_a_429_matches_the_openapi_document(limited, capfd):
    """With RATE_LIMIT set the document lists the 429 of POST /api/analytics, with Retry-After; a real one matches."""
    client = limited.test_client()
    doc = strict_json(client.get("/api/openapi.json").data)
    assert "Retry-After" in documented(doc, "/api/analytics", "post", 429)["headers"]
    for n in range(3):
        client.post("/api/analytics", data=batch(f"d{n}"))
    response = client.post("/api/analytics", data=batch("d-over"))
    assert response.status_code == 429
    assert_matches(doc, "/api/analytics", "post", response)
    capfd.readouterr()


def test_without_a_limit_nothing_is_registered():
    """RATE_LIMIT off (the default): no limiter, no hook of Flask-Limiter's, and Flask-Limiter not even imported; with
    a limit, its hooks are there (so this test can tell)."""

    def limiter_hooks(app: Any) -> list[str]:
        hooks = [*app.before_request_funcs[None], *app.after_request_funcs[None], *app.teardown_request_funcs[None]]
        return [repr(hook) for hook in hooks if "flask_limiter" in repr(hook) or "Limiter" in repr(hook)]

    off, on = create_app({"TESTING": True}), create_app({"TESTING": True, "RATE_LIMIT": "5/second"})
    assert ("rate_limiter" in off.extensions, limiter_hooks(off)) == (False, [])
    assert "rate_limiter" in on.extensions and len(limiter_hooks(on)) == 3
    probe = "import sys; from app import create_app; create_app(); print('flask_limiter' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["False"], result.stderr


@pytest.mark.parametrize("storage", ["memory://", "redis://127.0.0.1:1/0"])
def test_building_the_app_starts_no_thread(storage):
    """create_app, which gunicorn's master runs before forking, leaves no thread running and connects to nothing."""
    before = set(threading.enumerate())
    create_app({"TESTING": True, "RATE_LIMIT": "5/second", "RATE_LIMIT_STORAGE": storage})
    assert set(threading.enumerate()) == before


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"RATE_LIMIT": "lots"}, "RATE_LIMIT must be a rate such as 600/minute"),
        ({"RATE_LIMIT": "600/fortnight"}, "not '600/fortnight'"),
        ({"RATE_LIMIT": "0/minute"}, "not '0/minute'"),
        ({"RATE_LIMIT": ""}, "not ''"),
        ({"RATE_LIMIT": 600}, "not 600"),
        ({"RATE_LIMIT_STORAGE": "memcached://127.0.0.1:11211"}, "RATE_LIMIT_STORAGE must be memory:// or a redis URL"),
        ({"RATE_LIMIT_STORAGE": "redis://cache:port/0"}, "not 'redis://cache:port/0'"),
        ({"RATE_LIMIT_STORAGE": "redis:///0"}, "not 'redis:///0'"),
        ({"RATE_LIMIT_STORAGE": "redis://cache:6379/zero"}, "not 'redis://cache:6379/zero'"),
        ({"RATE_LIMIT_STORAGE": "memory"}, "not 'memory'"),
        ({"RATE_LIMIT_STORAGE": "redis://:hunter2@cache:port/0"}, "not 'redis://:***@cache:port/0'"),
    ],
)
def test_bad_settings_stop_the_start(settings, message):
    """A rate or storage URL that cannot be used is one line naming the setting and its value, never a password."""
    with pytest.raises(SettingsError) as refused:
        create_app({"TESTING": True, **settings})
    assert message in str(refused.value)
    assert "hunter2" not in str(refused.value)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("ANALYTICS_RATE_LIMIT", "600 a minute", "RATE_LIMIT must be a rate such as 600/minute"),
        ("ANALYTICS_RATE_LIMIT_STORAGE", "redis//cache:6379", "RATE_LIMIT_STORAGE must be memory:// or a redis URL"),
    ],
)
def test_bad_setting_stops_gunicorn_with_one_line(variable, value, named):
    """Under gunicorn with several workers, a bad rate or storage is one line on stderr naming it, and exit 1."""
    assert named in refusal(run_gunicorn({variable: value}))


# --- real gunicorn ----------------------------------------------------------------------------------------------


def flood(port: int, source: str, count: int, tag: str, threads: int = 8) -> list[tuple[str, int, dict, Any]]:
    """``count`` batches from ``source`` at once on ``threads`` connections at a time: (event id, status, headers,
    body) of each."""

    def one(n: int) -> tuple[str, int, dict, Any]:
        event_id = f"{tag}-{n}"
        return (event_id, *post(port, batch(event_id), source))

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(one, range(count)))


def test_memory_storage_counts_in_each_worker(start_server: Callable[..., Server]):
    """memory://: each of 2 workers admits exactly its own 4 of one client's batches, so the client gets up to 8:
    the limit times the workers. Each request is followed to the worker that took it."""
    server = start_server(workers=2, env={"ANALYTICS_RATE_LIMIT": "4/hour"})
    start = server.fence()
    answers: dict[int, list[int]] = {}
    admitted = []
    for n in range(12):
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30, source_address=(CLIENTS[0], 0))
        connection.connect()
        worker = server.wait_for_worker(connection.sock.getsockname()[1])
        connection.request("POST", "/api/analytics", batch(f"m-{n}"), {"Content-Type": "application/json"})
        response = connection.getresponse()
        body, headers = strict_json(response.read()), dict(response.headers)
        connection.close()
        answers.setdefault(worker, []).append(response.status)
        if response.status == 200:
            admitted.append(f"m-{n}")
        else:
            assert_refused(response.status, headers, body, 3601)
    assert set(answers) <= server.worker_pids()
    for statuses in answers.values():
        taken = min(len(statuses), 4)
        assert statuses == [200] * taken + [429] * (len(statuses) - taken)
    # 12 batches over 2 workers: one took at least 6, so at least 4 were admitted; at most 4 per worker.
    assert 4 <= len(admitted) <= 8
    assert sorted(line["id"] for line in server.lines_since(start)) == sorted(admitted)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, stopped after it."""
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@needs_redis
def test_redis_storage_shares_one_count_across_workers_and_instances(
    start_server: Callable[..., Server], redis_server: RedisServer
):
    """redis://: 80 batches from one client at once, 8 at a time, over 4 workers: exactly 20 admitted, the limit,
    and only they are written; the rest are JSON 429s. Meanwhile another client is admitted. A second instance on the
    same redis (by its unix socket) counts the same client as used up, and a third client as new."""
    limit = {"ANALYTICS_RATE_LIMIT": "20/hour"}
    server = start_server(workers=4, env={**limit, "ANALYTICS_RATE_LIMIT_STORAGE": redis_server.url})
    start = server.fence()
    answers = flood(server.port, CLIENTS[0], 80, "r")
    other = [post(server.port, batch(f"r-other-{n}"), CLIENTS[1]) for n in range(3)]
    admitted = [event_id for event_id, status, _, _ in answers if status == 200]
    assert len(admitted) == 20
    for _, status, headers, body in answers:
        if status != 200:
            assert_refused(status, headers, body, 3601)
    assert [(status, body) for status, _, body in other] == [(200, ACCEPTED)] * 3
    lines = server.lines_since(start)
    assert sorted(line["id"] for line in lines) == sorted(admitted + [f"r-other-{n}" for n in range(3)])

    second = start_server(workers=2, env={**limit, "ANALYTICS_RATE_LIMIT_STORAGE": redis_server.unix_url})
    status, headers, body = post(second.port, batch("r-second"), CLIENTS[0])
    assert_refused(status, headers, body, 3601)
    assert post(second.port, batch("r-third"), CLIENTS[2])[::2] == (200, ACCEPTED)


@needs_redis
def test_retry_after_is_when_the_window_ends(start_server: Callable[..., Server], redis_server: RedisServer):
    """2 per 5 seconds: the third batch is a 429 whose Retry-After is at most the window and a second; after waiting
    that long the client is admitted again, with a new window's count."""
    env = {"ANALYTICS_RATE_LIMIT": "2 per 5 seconds", "ANALYTICS_RATE_LIMIT_STORAGE": redis_server.url}
    server = start_server(workers=2, env=env)
    answers = [post(server.port, batch(f"w-{n}"), CLIENTS[0]) for n in range(3)]
    assert [status for status, _, _ in answers] == [200, 200, 429]
    wait = assert_refused(*answers[2], most_seconds=6)
    time.sleep(wait)
    again = [post(server.port, batch(f"w-again-{n}"), CLIENTS[0])[0] for n in range(3)]
    assert again == [200, 200, 429]


@needs_redis
def test_redis_unreachable_counts_in_each_worker_and_never_answers_500(
    start_server: Callable[..., Server], tmp_path: Path
):
    """With redis not running the worker counts in memory (3 admitted, then JSON 429s, never a 500), saying so once
    on stderr; once redis is back (on the same port) the worker finds it on its own and counts there again."""
    redis = RedisServer(tmp_path)
    env = {"ANALYTICS_RATE_LIMIT": "3/hour", "ANALYTICS_RATE_LIMIT_STORAGE": redis.url}
    server = start_server(workers=1, env=env)
    answers = [post(server.port, batch(f"u-{n}"), CLIENTS[0]) for n in range(5)]
    assert [status for status, _, _ in answers] == [200, 200, 200, 429, 429]
    for answer in answers[3:]:
        assert_refused(*answer, most_seconds=3601)

    def stderr_lines(text: str) -> list[dict[str, Any]]:
        return [line for line in map(json.loads, server.stderr_path.read_text().splitlines()) if text in line["event"]]

    assert len(stderr_lines("falling back to in-memory storage")) == 1
    redis.start()
    try:
        # Flask-Limiter looks for redis again 1, 2, 4, 8, ... seconds after its last look, at a request.
        deadline = time.monotonic() + 60
        statuses = []
        while not stderr_lines("Rate limit storage recovered") and time.monotonic() < deadline:
            statuses.append(post(server.port, batch(uuid.uuid4().hex), CLIENTS[1])[0])
            time.sleep(0.2)
        assert stderr_lines("Rate limit storage recovered")
        assert set(statuses) <= {200, 429}
        # redis's count for the first client starts afresh: the worker's memory count is left behind.
        back = [post(server.port, batch(f"u-back-{n}"), CLIENTS[0])[0] for n in range(4)]
        assert back == [200, 200, 200, 429]
    finally:
        redis.stop()


# --- nginx in front -----------------------------------------------------------------------------------------------


@needs_nginx
def test_nginx_limits_a_flooding_address_and_not_another(start_server: Callable[..., Server], tmp_path: Path):
    """deploy/nginx.conf as shipped (10 per second per address, a burst of 50): 150 batches from one address at once
    get JSON 429s with Retry-After from nginx, which never reach the service; another address sending meanwhile gets
    only 200s. What was admitted is within the burst plus the rate over the time taken, and only it is written."""
    server = start_server(workers=2)
    nginx = Nginx(tmp_path, server.port).start()
    try:
        start = server.fence()
        began = time.monotonic()
        others: list[tuple[int, Any]] = []

        def other_client() -> None:
            for n in range(10):
                status, _, body = post(nginx.port, batch(f"n-other-{n}"), CLIENTS[1])
                others.append((status, body))
                time.sleep(0.05)

        thread = threading.Thread(target=other_client)
        thread.start()
        answers = flood(nginx.port, CLIENTS[0], 150, "n", threads=4)
        thread.join(60)
        elapsed = time.monotonic() - began
        lines = server.lines_since(start)
    finally:
        nginx.stop()
    statuses = Counter(status for _, status, _, _ in answers)
    assert set(statuses) == {200, 429}
    # nginx admits the burst at once, then one per tenth of a second (and one more for a part-spent tenth).
    assert 50 <= statuses[200] <= 50 + 10 * elapsed + 1
    for _, status, headers, body in answers:
        if status == 429:
            assert_refused(status, headers, body, 1)
    assert others == [(200, ACCEPTED)] * 10
    admitted = [event_id for event_id, status, _, _ in answers if status == 200]
    assert sorted(line["id"] for line in lines) == sorted(admitted + [f"n-other-{n}" for n in range(10)])
    refused = [entry for entry in nginx.access() if entry["status"] == 429]
    assert len(refused) == statuses[429]
    assert all(entry["upstream_status"] == "" and entry["remote_addr"] == CLIENTS[0] for entry in refused)
