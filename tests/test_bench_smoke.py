"""The benchmark harness (bench/) starts and checks what it claims to: not a measurement, no timing asserted."""

import argparse
import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from analytics.schemas import EventSchema
from bench import BenchError, profiles
from bench.cli import parse_header, parse_service, parse_variant
from bench.measure import count_problems
from bench.payloads import make_body, make_large_body
from bench.servers import ServerSpec
from bench.wrk import WrkResult, parse_wrk, run_wrk, wrk_script
from config import Config
from tests.harness.nats import require_binary

ROOT = Path(__file__).resolve().parent.parent

WRK_OUTPUT = """\
Running 15s test @ http://127.0.0.1:40001/api/analytics
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.21ms  402.11us  12.02ms   91.02%
  60000 requests in 15.00s, 10.05MB read
Requests/sec:   4000.00
BENCH_RESULT {"requests": 60000, "duration_us": 15000000, "bytes": 10538000, "status_errors": 0, \
"connect_errors": 0, "read_errors": 2, "write_errors": 0, "timeouts": 1, "p50_us": 3100, "p90_us": 3900, \
"p99_us": 5200, "max_us": 12020}
"""


def test_benchmark_events_are_realistic_and_valid() -> None:
    """Events are 150-200 bytes of compact JSON, carry every field, have unique ids and pass the real schema."""
    body = json.loads(make_body(100))
    events = body["events"]
    assert len(events) == 100
    schema = EventSchema(max_bytes=Config.MAX_EVENT_BYTES)
    for event in events:
        assert 150 <= len(json.dumps(event, separators=(",", ":"))) <= 200
        assert set(event) == {"type", "payload", "userId", "sessionId", "id", "timestamp"}
        assert 2 <= len(event["payload"]) <= 3
        assert datetime.fromisoformat(event["timestamp"]).tzinfo is not None
        schema.load(event)
    assert len({event["id"] for event in events}) == 100
    assert make_body(100) == make_body(100), "every run must send the same bytes"


def test_large_body_is_a_valid_batch_just_under_the_body_limit() -> None:
    """The RSS burst sends MAX_EVENTS events in just under MAX_BODY_BYTES, each event within MAX_EVENT_BYTES."""
    raw = make_large_body()
    assert Config.MAX_BODY_BYTES - 4096 < len(raw) <= Config.MAX_BODY_BYTES
    events = json.loads(raw)["events"]
    assert len(events) == Config.MAX_EVENTS
    schema = EventSchema(max_bytes=Config.MAX_EVENT_BYTES)
    for event in events[:50]:
        schema.load(event)


def test_parse_wrk_reads_the_summary_of_the_done_hook() -> None:
    """The JSON line the Lua ``done`` hook prints becomes the run's numbers."""
    result = parse_wrk(WRK_OUTPUT)
    assert result.requests == 60000
    assert result.rps == pytest.approx(4000.0)
    assert (result.p50_us, result.p99_us) == (3100, 5200)
    assert result.socket_errors == 3


def test_parse_wrk_without_a_summary_is_an_error() -> None:
    """Output without the summary line (wrk without the script) is refused, not read as zero."""
    with pytest.raises(BenchError, match="no summary"):
        parse_wrk(WRK_OUTPUT.split("BENCH_RESULT")[0])


def _result(requests: int, status_errors: int = 0, read_errors: int = 0) -> WrkResult:
    """A wrk summary with the given counts."""
    return WrkResult(requests, 15_000_000, 0, status_errors, 0, read_errors, 0, 0, 1, 1, 1, 1)


@pytest.mark.parametrize(
    ("result", "logged", "problem"),
    [
        (_result(1000), 10_000, None),
        (_result(1000), 10_000 + 16 * 10, None),
        (_result(1000, read_errors=2), 10_000 + 18 * 10, None),
        (_result(1000), 9_990, "only 9990 event lines for 10000 acknowledged events"),
        (_result(1000), 10_000 + 17 * 10, "10170 event lines for 10000 acknowledged events (at most 160 unseen)"),
        (_result(1000), 10_005, "10005 event lines is not a whole number of batches of 10"),
        (_result(1000, status_errors=3), 9_970, "3 answers were not 2xx"),
    ],
)
def test_count_problems(result: WrkResult, logged: int, problem: str | None) -> None:
    """Every acknowledged event must be logged; only requests wrk never saw answered may add lines."""
    acknowledged, problems = count_problems(result, logged, batch=10, connections=16)
    assert acknowledged == (result.requests - result.status_errors) * 10
    assert problems == ([problem] if problem else [])


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("sync", ServerSpec("service")),
        ("gthread:2", ServerSpec("service", "gthread", 2)),
        ("gthread", ServerSpec("service", "gthread", 4)),
    ],
)
def test_parse_service(text: str, spec: ServerSpec) -> None:
    """--service takes sync or gthread:THREADS."""
    assert parse_service(text) == spec


def test_parse_variant_and_header() -> None:
    """--variant is a name and ANALYTICS_* settings without the prefix; --header a name and a value."""
    assert parse_variant("metrics-off:METRICS=false") == ("metrics-off", (("METRICS", "false"),))
    assert parse_variant("two:A=1;B=x=y") == ("two", (("A", "1"), ("B", "x=y")))
    for text in ("metrics-off", "Bad Name:A=1", "x:=1", "x:A"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_variant(text)
    assert parse_header("User-Agent: Mozilla/5.0 (X11)") == ("User-Agent", "Mozilla/5.0 (X11)")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_header("User-Agent")


def test_count_problems_names_what_is_counted() -> None:
    """With the nats sink the events counted are those stored in the stream, and the problems say so."""
    _, problems = count_problems(_result(1000), 9_990, batch=10, connections=16, written="events stored")
    assert problems == ["only 9990 events stored for 10000 acknowledged events"]


def test_wrk_script_posts_the_body_file() -> None:
    """The Lua script reads the body from its file, sets the headers and prints the summary in ``done``."""
    script = wrk_script(Path("/tmp/bench/b10.json"), {"Connection": "close"})
    assert 'io.open("/tmp/bench/b10.json", "rb")' in script
    assert 'wrk.method = "POST"' in script
    assert 'wrk.headers["Connection"] = "close"' in script
    assert "function done(summary, latency, requests)" in script
    assert "BENCH_RESULT " in script


def test_profile_summary_charges_owners() -> None:
    """orjson below our code is orjson's, a poll or a lock is waiting, the rest is the innermost Python frame's."""
    entry = "<module> (gunicorn:8);Arbiter.run (gunicorn/arbiter.py:247);wsgi_app (flask/app.py:1511)"
    raw = "\n".join(
        [
            f"{entry};write (analytics/eventlog.py:80);dumps (orjson/orjson.cpython-311-x86_64-linux-gnu.so) 6",
            f"{entry};load (marshmallow/schema.py:700);unicode_new (libpython3.11.so.1.0) 3",
            f"{entry};SocketUnreader.chunk (gunicorn/http/unreader.py:100);recv (libc.so.6);poll (libc.so.6) 1",
            f"{entry};emit (logging/__init__.py:927);PyThread_acquire_lock_timed (libpython3.11.so.1.0) 2",
        ]
    )
    summary = profiles.summarize(profiles.parse_raw(raw))
    assert (summary.samples, summary.on_cpu) == (12, 9)
    assert dict(summary.waits) == {"poll (socket or select)": 1, "lock": 2}
    assert dict(summary.owners) == {"orjson": 6, "marshmallow": 3}
    assert summary.inclusive_owners["flask"] == 9
    assert summary.inclusive_owners["service code"] == 6
    assert summary.self_lines == {"analytics/eventlog.py:80 write": 6}
    assert "orjson 66.7%" in profiles.report("sample", summary)


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Keeps every body posted to it and answers 200."""

    protocol_version = "HTTP/1.1"
    bodies: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        """Quiet: wrk's requests are not news."""


@pytest.fixture
def recorder() -> Iterator[tuple[int, list[bytes]]]:
    """An HTTP server on a free loopback port that keeps the bodies posted to it: its port and the bodies."""
    bodies: list[bytes] = []
    handler = type("Recorder", (_Recorder,), {"bodies": bodies})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], bodies
    finally:
        server.shutdown()
        thread.join(10)


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)")
def test_wrk_gives_every_event_an_id_of_its_own(tmp_path: Path, recorder: tuple[int, list[bytes]]) -> None:
    """Each request wrk sends is the prepared body with new ids, none seen in another request or another wrk run,
    each as long as the UUID it replaces: a stream keeping one copy per id would otherwise store one batch."""
    port, bodies = recorder
    prepared = make_body(3)
    (tmp_path / "b3.json").write_bytes(prepared)
    script = tmp_path / "b3.lua"
    script.write_text(wrk_script(tmp_path / "b3.json"))
    for _ in range(2):
        result = run_wrk(f"http://127.0.0.1:{port}/api/analytics", script, 1, 2, 2, None)
        assert result.requests > 0 and result.status_errors == 0
    template = json.loads(prepared)
    ids = []
    for body in bodies:
        assert len(body) == len(prepared)
        sent = json.loads(body)
        ids += [event.pop("id") for event in sent["events"]]
        assert sent == {**template, "events": [{k: v for k, v in e.items() if k != "id"} for e in template["events"]]}
    assert len(ids) == 3 * len(bodies) >= 3 * 2
    assert len(set(ids)) == len(ids)


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)")
def test_harness_runs_end_to_end(tmp_path: Path) -> None:
    """A one-second run against both servers prints the table and finds every acknowledged event logged."""
    command = [sys.executable, "bench/run.py", "--duration", "1", "--warmup", "0", "--batches", "5"]
    command += ["--rss-requests", "1", "--settle", "0.2", "--no-pin", "--results", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| floor | 5 |" in done.stdout
    assert "| service (sync) | 5 |" in done.stdout
    assert "every acknowledged event was logged" in done.stdout
    assert "peak RSS" in done.stdout
    (saved,) = tmp_path.glob("run-*.json")
    record = json.loads(saved.read_text())
    assert {m["server"] for m in record["measurements"]} == {"floor", "service (sync)"}
    assert all(m["problems"] == [] and m["logged"] >= m["acknowledged"] > 0 for m in record["measurements"])


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)")
def test_harness_measures_the_nats_sink_beside_stdout(tmp_path: Path) -> None:
    """With --sink stdout --sink nats the service runs twice, the second writing to a nats-server the harness
    starts; its events are counted in the stream (every acknowledged one stored) and compared with stdout's."""
    require_binary()
    command = [sys.executable, "bench/run.py", "--duration", "1", "--warmup", "0", "--batches", "5"]
    command += ["--sink", "stdout", "--sink", "nats", "--rss-requests", "2", "--settle", "0.2", "--no-pin"]
    command += ["--results", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| service (sync, nats sink) | 5 |" in done.stdout
    assert "- service (sync, nats sink) over service (sync), batch 5: events/s " in done.stdout
    assert "every acknowledged event was logged" in done.stdout
    (saved,) = tmp_path.glob("run-*.json")
    record = json.loads(saved.read_text())
    nats = [m for m in record["measurements"] if m["server"] == "service (sync, nats sink)"]
    assert len(nats) == 1 and nats[0]["problems"] == [] and nats[0]["logged"] >= nats[0]["acknowledged"] > 0
    (memory,) = [entry for entry in record["memory"] if entry["server"] == "service (sync, nats sink)"]
    assert memory["problems"] == []


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)")
def test_harness_runs_a_variant_with_its_settings(tmp_path: Path) -> None:
    """--variant runs the service a second time with its settings: MAX_EVENTS=4 makes that one refuse the batch of
    five at the check before the load (413), while the same service without it passes the check."""
    command = [sys.executable, "bench/run.py", "--duration", "1", "--warmup", "0", "--batches", "5", "--no-pin"]
    command += ["--variant", "small:MAX_EVENTS=4", "--rss-requests", "0", "--results", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "service (sync) [small] answered 413" in done.stderr
    assert "service (sync) answered" not in done.stderr


def run_table(script: str) -> str:
    """What ``script`` prints for batches of 1 and 10 in one round, checked to hold a row of two timings for each."""
    run = subprocess.run(
        [sys.executable, script, "--batches", "1,10", "--rounds", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    rows = [line.split(" | ") for line in run.stdout.splitlines() if line[:1].isdigit()]
    assert [row[0] for row in rows] == ["1", "10"]
    assert all(float(row[1]) > 0 and float(row[2]) > 0 for row in rows)
    return run.stdout


def test_inprocess_bench_prints_a_row_per_batch_and_writes_no_line_on_its_stdout() -> None:
    """bench/inprocess.py answers every request of both apps (it checks each answer) and prints only its table:
    the event lines went to /dev/null."""
    assert len(run_table("bench/inprocess.py").splitlines()) == 3


def test_decode_paths_compares_like_with_like_and_names_where_the_parsers_disagree() -> None:
    """bench/decode_paths.py checks that both paths load the same events before timing them, and shows why the
    typed path is not a drop-in: msgspec writes doubles and reads large integers differently from orjson."""
    out = run_table("bench/decode_paths.py")
    written = re.search(r"written differently: (\d+) of 100000", out)
    assert written and int(written[1]) > 0, out
    assert "numbers read as different values: 18446744073709551616, -9223372036854775809, 1234" in out
