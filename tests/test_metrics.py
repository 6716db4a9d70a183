"""Prometheus metrics: counts that match what the event log holds, across real gunicorn workers, their deaths and
restarts; /metrics only for METRICS_ALLOW (through nginx too); an exposition promtool accepts; METRICS off builds
nothing."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from analytics.eventlog import StdoutSink
from analytics.metrics import events_dropped
from app import create_app, register_extensions
from config import Config, SettingsError
from tests.harness.clients import OUTSIDER, SlowUpload, connect
from tests.harness.gunicorn import GUNICORN, ROOT, Server, refusal, run_gunicorn
from tests.harness.lines import strict_json
from tests.harness.load import expected_answer, make_batches, run_load, sized_event, summarize
from tests.harness.nginx import Nginx, needs_nginx

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed; apt-get install --no-install-recommends prometheus"
)
CONTENT_TYPE = re.compile(r"text/plain; version=\d+\.\d+\.\d+; charset=utf-8")
NOT_FOUND = {"error": "Not found"}
INGEST = "/api/analytics"
REQUESTS = "analytics_http_request_duration_seconds_count"
DROP_REASONS = ("invalid", "too_large", "bot", "excluded")
TOO_LARGE_MESSAGE = f"Event is larger than {Config.MAX_EVENT_BYTES} bytes as JSON."
# A batch with one event of each fate: written, invalid (no type, an unknown field), too large, not an object.
MIXED = {
    "events": [
        {"type": "ok", "id": "m-0"},
        {"id": "m-1", "colour": "red"},
        sized_event("m-2", Config.MAX_EVENT_BYTES + 1),
        5,
    ]
}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition by (name, sorted labels), read with prometheus_client's own parser."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; a sample the exposition lacks fails the test."""
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"{name}{labels} is not exposed"
    return samples[key]


def scrape(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET /metrics: status, headers and body (an error's too)."""
    request = urllib.request.Request(url + "/metrics", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def samples_of(server: Server) -> Samples:
    """The server's metrics, scraped from loopback, which METRICS_ALLOW allows by default."""
    status, headers, body = scrape(server.url)
    assert status == 200, body
    assert CONTENT_TYPE.fullmatch(headers["Content-Type"])
    return parse(body.decode())


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    """``condition()``'s first true result, polled; fails the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)
    return result


# The Flask test client: one process, the app's own registry.


def test_counts_of_a_batch_with_every_fate(client):
    """One batch: the written event, the rejected ones by reason, the batch, its bytes, the answer and the sink."""
    body = orjson.dumps(MIXED)
    response = client.post("/api/analytics", data=body, content_type="application/json")
    assert response.status_code == 200
    assert [entry["index"] for entry in response.get_json()["rejected"]] == [1, 2, 3]
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert CONTENT_TYPE.fullmatch(metrics.headers["Content-Type"])
    samples = parse(metrics.get_data(as_text=True))
    assert value(samples, "analytics_events_accepted_total") == 1
    # The event over MAX_EVENT_BYTES is too large; a missing type, an unknown field, a number: invalid.
    dropped = {reason: value(samples, "analytics_events_dropped_total", reason=reason) for reason in DROP_REASONS}
    assert dropped == {"invalid": 2, "too_large": 1, "bot": 0, "excluded": 0}
    assert value(samples, "analytics_batch_events_count") == 1
    assert value(samples, "analytics_batch_events_sum") == 4
    assert value(samples, "analytics_batch_events_bucket", le="2.0") == 0
    assert value(samples, "analytics_batch_events_bucket", le="5.0") == 1
    assert value(samples, "analytics_request_body_bytes_total") == len(body)
    assert value(samples, REQUESTS, path=INGEST, status="200") == 1
    assert value(samples, "analytics_http_request_duration_seconds_bucket", path=INGEST, status="200", le="30.0") == 1
    assert value(samples, "analytics_sink_write_duration_seconds_count", sink="stdout") == 1
    assert value(samples, "analytics_sink_write_failures_total", sink="stdout") == 0


def test_refusals_and_errors_counted_by_status(client):
    """Answers the service refuses are counted by path and status; a path that is no route of the service as
    "other", so that no label holds what a client chose."""
    assert client.post("/api/analytics", data=b"{", content_type="application/json").status_code == 400
    all_invalid = client.post("/api/analytics", json={"events": [{"id": "x"}, 7]})
    assert all_invalid.status_code == 400
    assert client.get("/no/such/path").status_code == 404
    assert client.get("/../etc/passwd").status_code == 404
    assert client.put("/api/analytics", json={}).status_code == 405
    samples = parse(client.get("/metrics").get_data(as_text=True))
    assert value(samples, REQUESTS, path=INGEST, status="400") == 2
    assert value(samples, REQUESTS, path=INGEST, status="405") == 1
    assert value(samples, REQUESTS, path="other", status="404") == 2
    paths = {dict(labels).get("path") for name, labels in samples if name == REQUESTS}
    assert paths == {INGEST, "other"}
    # A 400 whose events are all invalid still says why each was refused: they count as dropped.
    assert value(samples, "analytics_events_dropped_total", reason="invalid") == 2
    assert value(samples, "analytics_events_accepted_total") == 0
    assert value(samples, "analytics_batch_events_count") == 1


def test_a_failed_sink_write_is_counted(app: Flask):
    """stdout a broken pipe: the 500, the sink's failure and its time are counted, and no event as accepted."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        register_extensions(app, stdout=write_end)
        client = app.test_client()
        response = client.post("/api/analytics", json={"events": [{"type": "lost"}]})
        assert (response.status_code, response.get_json()) == (500, {"error": "Failed to process events"})
        samples = parse(client.get("/metrics").get_data(as_text=True))
    finally:
        os.close(write_end)
    assert value(samples, "analytics_sink_write_failures_total", sink="stdout") == 1
    assert value(samples, "analytics_sink_write_duration_seconds_count", sink="stdout") == 1
    assert value(samples, REQUESTS, path=INGEST, status="500") == 1
    assert value(samples, "analytics_events_accepted_total") == 0


def test_events_dropped_counts_by_reason(app: Flask):
    """What enrichment drops (bots, excluded addresses) is counted by its reason; an unknown reason is a bug."""
    with app.test_request_context("/api/analytics"):
        events_dropped("bot", 3)
        events_dropped("excluded", 1)
        with pytest.raises(KeyError):
            events_dropped("spam", 1)
    samples = parse(app.test_client().get("/metrics").get_data(as_text=True))
    assert value(samples, "analytics_events_dropped_total", reason="bot") == 3
    assert value(samples, "analytics_events_dropped_total", reason="excluded") == 1


@pytest.mark.parametrize(
    ("allow", "peer", "forwarded_for", "served"),
    [
        pytest.param(None, "127.0.0.1", None, True, id="loopback"),
        pytest.param(None, "::1", None, True, id="IPv6 loopback"),
        pytest.param(None, "::ffff:127.0.0.1", None, True, id="IPv4-mapped loopback"),
        # Loopback is a trusted proxy: the client is the address it forwards.
        pytest.param(None, "127.0.0.1", "203.0.113.5", False, id="public client behind the local proxy"),
        pytest.param(None, "10.1.2.3", None, False, id="another host"),
        # An untrusted peer's X-Forwarded-For is not believed.
        pytest.param(None, "10.1.2.3", "127.0.0.1", False, id="another host claiming loopback"),
        pytest.param(["10.0.0.0/8"], "10.1.2.3", None, True, id="allowed network"),
        pytest.param(["203.0.113.0/24"], "127.0.0.1", "203.0.113.5", True, id="allowed network behind the proxy"),
        pytest.param(["203.0.113.0/24"], "127.0.0.1", None, False, id="loopback not in the allowed networks"),
    ],
)
def test_metrics_only_for_metrics_allow(allow, peer, forwarded_for, served):
    """/metrics answers the client as TRUSTED_PROXIES resolves it, within METRICS_ALLOW; anyone else gets the JSON
    404 of an unknown path, and a diagnostic line says why."""
    app = create_app({"TESTING": True, **({"METRICS_ALLOW": allow} if allow else {})})
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    with capture_logs() as logs:
        response = app.test_client().get("/metrics", headers=headers, environ_base={"REMOTE_ADDR": peer})
    refusals = [line for line in logs if line["event"] == "metrics_refused"]
    if served:
        assert response.status_code == 200
        assert "analytics_events_accepted_total" in response.get_data(as_text=True)
        assert refusals == []
    else:
        assert (response.status_code, response.get_json()) == (404, NOT_FOUND)
        assert response.headers["X-Request-ID"]
        client_ip = forwarded_for if forwarded_for and peer == "127.0.0.1" else peer
        assert [line["client_ip"] for line in refusals] == [client_ip]


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "POST", "DELETE", "PATCH"])
def test_to_a_refused_client_metrics_is_an_unknown_path_whatever_the_method(method):
    """Outside METRICS_ALLOW every method gets what an unknown path gets (no Allow header saying the page exists);
    inside it, a method other than GET and HEAD is a 405 naming those."""
    client = create_app({"TESTING": True}).test_client()
    outside = {"REMOTE_ADDR": "192.0.2.2"}
    refused = client.open("/metrics", method=method, environ_base=outside)
    unknown = client.open("/no-such-page", method=method, environ_base=outside)
    assert (refused.status_code, refused.headers.get("Allow"), refused.data) == (404, None, unknown.data)
    allowed = client.open("/metrics", method=method)
    if method in ("GET", "HEAD"):
        assert allowed.status_code == 200
    else:
        assert (allowed.status_code, allowed.headers["Allow"]) == (405, "GET, HEAD")


def test_metrics_off_builds_nothing():
    """METRICS=false: no /metrics, no hook, no wrapped WSGI app or sink; requests are served as ever."""
    app = create_app({"TESTING": True, "METRICS": False})
    client = app.test_client()
    assert (client.get("/metrics").status_code, client.get("/metrics").get_json()) == (404, NOT_FOUND)
    assert "metrics" not in app.extensions
    assert app.extensions["ingestor"].metrics is None
    assert [type(sink) for sink in app.extensions["event_log"].sinks] == [StdoutSink]
    assert app.wsgi_app.__func__ is Flask.wsgi_app
    assert "/metrics" not in {rule.rule for rule in app.url_map.iter_rules()}
    # On, the same factory wraps the WSGI app and adds the route: the checks above can tell.
    on = create_app({"TESTING": True})
    assert getattr(on.wsgi_app, "__func__", None) is not Flask.wsgi_app
    assert "/metrics" in {rule.rule for rule in on.url_map.iter_rules()}
    response = client.post("/api/analytics", json={"events": [{"type": "a"}]})
    assert (response.status_code, response.get_json()) == (200, {"success": True, "received": 1})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"METRICS": "yes"}, "METRICS must be true or false, not 'yes'"),
        ({"METRICS_ALLOW": "10.0.0.0/8,prometheus"}, "METRICS_ALLOW: 'prometheus' is not an address or a CIDR network"),
        ({"METRICS_ALLOW": ["10.0.0.0/33"]}, "METRICS_ALLOW: '10.0.0.0/33' is not an address or a CIDR network"),
        ({"METRICS_ALLOW": " , "}, "METRICS_ALLOW must name at least one network (METRICS=false turns metrics off)"),
        ({"METRICS_ALLOW": [10]}, "METRICS_ALLOW must be a list of strings"),
    ],
)
def test_bad_metrics_settings(settings, message):
    """A bad METRICS or METRICS_ALLOW stops the start with one line naming it."""
    with pytest.raises(SettingsError) as error:
        create_app({"TESTING": True, **settings})
    assert str(error.value).startswith(message)


def test_metrics_allow_from_the_environment_is_split_on_commas(monkeypatch):
    """ANALYTICS_METRICS_ALLOW written comma-separated is a list of networks, as TRUSTED_PROXIES is."""
    monkeypatch.setenv("ANALYTICS_METRICS_ALLOW", "10.0.0.0/8, 192.168.0.1")
    app = create_app({"TESTING": True})
    assert app.config["METRICS_ALLOW"] == ["10.0.0.0/8", "192.168.0.1"]
    client = app.test_client()
    assert client.get("/metrics", environ_base={"REMOTE_ADDR": "192.168.0.1"}).status_code == 200
    assert client.get("/metrics").status_code == 404


# A process that forks after building its metrics, in multiprocess mode.
FORKED = """
import os
from analytics.metrics import Metrics
metrics = Metrics(multiprocess=True)
metrics.accepted(2)
child = os.fork()
if child == 0:
    metrics.accepted(5)
    os._exit(0)
os.waitpid(child, 0)
metrics.accepted(1)
print(metrics.exposition().decode())
"""


def test_writes_after_a_fork_go_to_the_childs_own_files(tmp_path):
    """Metrics built before a fork (gunicorn --preload) count the child in files of its own, not in the parent's:
    the scrape holds both processes' counts."""
    environment = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-c", FORKED], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert value(parse(run.stdout), "analytics_events_accepted_total") == 2 + 5 + 1
    assert len(list(tmp_path.glob("counter_*.db"))) == 2


# Real gunicorn: the workers' values in files, added up by the scrape.


def metrics_dirs(tmp: Path) -> list[Path]:
    """The metrics directories gunicorn made under ``tmp`` (its TMPDIR)."""
    return sorted(tmp.glob("analytics-metrics-*"))


def started_with_tmpdir(start_server: Callable[..., Server], tmp: Path, **kwargs: Any) -> Server:
    """gunicorn whose temporary files, the metrics directory among them, go under ``tmp``."""
    tmp.mkdir(exist_ok=True)
    env = {"TMPDIR": str(tmp), **kwargs.pop("env", {})}
    return start_server(env=env, **kwargs)


@needs_promtool
def test_promtool_accepts_the_exposition_of_real_workers(start_server):
    """Three workers, answers of every kind: promtool check metrics finds nothing to say about the exposition."""
    server = start_server(workers=3)
    for body in (orjson.dumps(MIXED), b"{", b'{"events": []}', orjson.dumps({"events": [{"type": "t"}] * 1001})):
        server.post("/api/analytics", body, {"Content-Type": "application/json"})
    server.post("/nowhere", b"")
    status, _, text = scrape(server.url)
    assert status == 200
    check = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert (check.returncode, check.stdout, check.stderr) == (0, b"", b"")
    names = {family.name for family in text_string_to_metric_families(text.decode())}
    assert names == {
        "analytics_http_request_duration_seconds",
        "analytics_request_body_bytes",
        "analytics_batch_events",
        "analytics_events_accepted",
        "analytics_events_dropped",
        "analytics_sink_write_duration_seconds",
        "analytics_sink_write_failures",
        "analytics_workers",
    }


def test_counters_equal_the_event_log_after_a_multi_worker_load(start_server):
    """Four workers under concurrent load: events accepted are the lines on stdout, events dropped the entries
    answered in ``rejected`` (by reason), and batches, bytes, answers and sink writes are the requests made."""
    server = start_server(workers=4)
    # The server answers once one worker has booted; on a busy machine the others may take a while longer.
    wait_until(lambda: value(samples_of(server), "analytics_workers") == 4, "all four workers booted")
    batches = make_batches(160, tag="mx")
    outcomes = run_load(server.port, batches, concurrency=16)
    assert [summarize(outcome) for outcome in outcomes] == [expected_answer(batch) for batch in batches]
    samples = samples_of(server)
    assert value(samples, "analytics_workers") == 4
    server.stop()
    lines = server.lines()
    assert value(samples, "analytics_events_accepted_total") == len(lines) == sum(len(b.accepted) for b in batches)
    rejected = [entry for outcome in outcomes for entry in outcome.body.get("rejected", [])]
    too_large = [entry for entry in rejected if entry["errors"] == {"_schema": [TOO_LARGE_MESSAGE]}]
    assert too_large, "the load holds events too large"
    assert value(samples, "analytics_events_dropped_total", reason="too_large") == len(too_large)
    assert value(samples, "analytics_events_dropped_total", reason="invalid") == len(rejected) - len(too_large)
    assert value(samples, "analytics_batch_events_count") == len(batches)
    assert value(samples, "analytics_batch_events_sum") == sum(len(batch.ids) for batch in batches)
    assert value(samples, "analytics_request_body_bytes_total") == sum(len(batch.body) for batch in batches)
    assert value(samples, REQUESTS, path=INGEST, status="200") == len(batches)
    assert value(samples, "analytics_sink_write_duration_seconds_count", sink="stdout") == len(batches)


def test_no_count_of_an_earlier_run_leaks_into_the_next(start_server, tmp_path):
    """The metrics directory is new at every start: files left by a run killed outright, even named in
    PROMETHEUS_MULTIPROC_DIR, add nothing; a run that ends removes its own."""
    first = started_with_tmpdir(start_server, tmp_path / "first", workers=2)
    for _ in range(3):
        assert first.post("/api/analytics", b'{"events": [{"type": "before"}]}')[0] == 200
    assert value(samples_of(first), "analytics_events_accepted_total") == 3
    # Killed outright, workers and all: no on_exit removes its directory.
    workers = first.worker_pids()
    first.stop(signal.SIGKILL)
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    [stale] = metrics_dirs(tmp_path / "first")
    assert any(stale.iterdir())
    second = started_with_tmpdir(
        start_server, tmp_path / "second", workers=2, env={"PROMETHEUS_MULTIPROC_DIR": str(stale)}
    )
    assert second.post("/api/analytics", b'{"events": [{"type": "after"}]}')[0] == 200
    assert value(samples_of(second), "analytics_events_accepted_total") == 1
    [own] = metrics_dirs(tmp_path / "second")
    assert any(own.iterdir())
    assert second.stop() == 0
    assert metrics_dirs(tmp_path / "second") == []


@pytest.mark.skipif(not os.access("/dev/shm", os.W_OK | os.X_OK), reason="no writable /dev/shm here")
def test_the_metrics_directory_is_in_memory_unless_tmpdir_says_otherwise(start_server):
    """Without TMPDIR the workers' files are in /dev/shm, where writing them never waits for a disk."""
    server = start_server(workers=1, env={"TMPDIR": ""})
    assert server.post("/api/analytics", b'{"events": [{"type": "shm"}]}')[0] == 200
    assert server.process
    master = Path(f"/proc/{server.process.pid}/fd")
    # The master made the files' directory, and holds files in it open (its own, empty values).
    targets = set()
    for fd in master.iterdir():
        try:
            targets.add(os.readlink(fd))
        except OSError:
            pass  # closed since the listing
    [directory] = {Path(target).parent for target in targets if "/analytics-metrics-" in target}
    assert directory.parent == Path("/dev/shm")
    assert server.stop() == 0
    assert not directory.exists()


def test_a_refused_start_leaves_no_metrics_directory(tmp_path):
    """A bad setting stops gunicorn in the master; the directory it made for the workers goes with it."""
    line = refusal(run_gunicorn({"TMPDIR": str(tmp_path), "ANALYTICS_METRICS_ALLOW": "internal"}))
    assert line == "analytics: cannot start: METRICS_ALLOW: 'internal' is not an address or a CIDR network"
    assert metrics_dirs(tmp_path) == []


def test_a_start_that_cannot_bind_leaves_no_metrics_directory(tmp_path):
    """gunicorn that cannot bind its port gives up without its on_exit hook; the directory goes all the same."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        environment = {**os.environ, "TMPDIR": str(tmp_path), "WEB_CONCURRENCY": "1"}
        run = subprocess.run(
            [str(GUNICORN), "wsgi:app", "--bind", f"127.0.0.1:{port}"],
            cwd=ROOT,
            env=environment,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert run.returncode == 1
    assert "Can't connect to" in run.stderr
    assert metrics_dirs(tmp_path) == []


def served_by(server: Server, body: bytes) -> int:
    """POST ``body`` and return the pid of the worker that answered it (200)."""
    upload = SlowUpload(server.port, body)
    pid = server.wait_for_worker(upload.port)
    status, _, answer = upload.finish()
    assert status == 200, answer
    return pid


def test_a_dead_workers_counts_stay_and_its_gauge_goes(start_server):
    """A worker killed outright: what it counted stays in the sums once gunicorn has replaced it, and
    analytics_workers counts the workers alive, not the dead one too."""
    server = start_server(workers=2)
    # The server answers once one worker has booted; on a busy machine the other may take a while longer.
    wait_until(lambda: value(samples_of(server), "analytics_workers") == 2, "both workers booted")
    one_event = b'{"events": [{"type": "counted"}]}'
    # The victim's request holds three events: its counts show in the sums as no other request's could.
    victim = served_by(server, b'{"events": [{"type": "counted"}, {"type": "counted"}, {"type": "counted"}]}')
    for _ in range(4):
        assert server.post("/api/analytics", one_event)[0] == 200
    events, requests = 7, 5
    before = samples_of(server)
    assert value(before, "analytics_events_accepted_total") == events
    assert value(before, "analytics_workers") == 2
    # Listed before the kill: listed after it, the list could hold the replacement already, on a busy machine.
    survivors = server.worker_pids() - {victim}
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(server.worker_pids() - survivors - {victim}) == 1, "gunicorn replaced the worker")
    [replacement] = server.worker_pids() - survivors
    # Once the replacement has served a request it has booted, gauge and all.
    while served_by(server, one_event) != replacement:
        events, requests = events + 1, requests + 1
        assert requests < 200, "the replacement worker never served a request"
    events, requests = events + 1, requests + 1
    after = samples_of(server)
    assert value(after, "analytics_events_accepted_total") == events
    assert value(after, REQUESTS, path=INGEST, status="200") == requests
    assert value(after, "analytics_workers") == 2


# Through the sample nginx configuration.


@needs_nginx
def test_nginx_keeps_metrics_internal(start_server, tmp_path):
    """deploy/nginx.conf passes /metrics on only for the local network's addresses; to anyone else it answers
    itself, with the JSON 404 of an unknown path, and the service never sees the request."""
    server = start_server(workers=1)
    nginx = Nginx(tmp_path, server.port).start()
    try:
        outsider = connect(nginx.port, OUTSIDER)
        try:
            outsider.request("GET", "/metrics")
            response = outsider.getresponse()
            refused = (response.status, response.getheader("Content-Type"), strict_json(response.read()))
            request_id = response.getheader("X-Request-ID")
        finally:
            outsider.close()
        status, headers, body = scrape(f"http://127.0.0.1:{nginx.port}")
        entries = nginx.access()
    finally:
        nginx.stop()
    assert refused == (404, "application/json", NOT_FOUND)
    assert [entry["upstream_status"] for entry in entries if entry["request_id"] == request_id] == [""]
    assert status == 200
    assert CONTENT_TYPE.fullmatch(headers["Content-Type"])
    # Had the outsider's request reached the service, it would be counted: the allowed scrape is counted only
    # after its exposition is made, so no /metrics request is in it at all.
    samples = parse(body.decode())
    assert value(samples, "analytics_workers") == 1
    assert [labels for name, labels in samples if ("path", "/metrics") in labels] == []


# Example alert rules in docs/operating.md.


@needs_promtool
def test_documented_alert_rules_are_valid_and_name_real_metrics(tmp_path, client):
    """The alert rules of docs/operating.md's Metrics section pass promtool check rules, and every metric they
    name (a sample's name, or a family's) is one the service exposes."""
    page = (ROOT / "docs" / "operating.md").read_text()
    section = page.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    [rules] = re.findall(r"```yaml\n(.*?)```", section, re.S)
    path = tmp_path / "analytics-rules.yml"
    path.write_text(rules)
    check = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    client.post("/api/analytics", json={"events": [{"type": "a"}]})
    text = client.get("/metrics").get_data(as_text=True)
    exposed = {name for name, _ in parse(text)} | {family.name for family in text_string_to_metric_families(text)}
    used = set(re.findall(r"\banalytics_[a-z_]+", rules))
    assert used and used <= exposed, used - exposed
