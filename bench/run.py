"""The benchmark of issue 3: the service against the floor, side by side, with one command.

    .venv/bin/python bench/run.py [--repeats 3] [--service sync --service gthread:4] [--profile DIR]

Both servers run under gunicorn with one worker pinned to CPU 0 (the service with
the production gunicorn.conf.py, the floor with bench/floor.py); wrk, this
harness and its helpers run on CPU 1. Only one server is under load at a time.
For each batch size and server: check that the answer is right, warm up, run wrk,
then check that the event lines that reached the server's stdout are the events
wrk saw acknowledged. One table at the end: requests/s, events/s, p50 and p99
latency and the ratio to the floor measured in the same run (medians of the
repeats); the worker's CPU time per request and the same ratio in CPU time,
which other load on a shared machine disturbs less; the cost per request and
per event; and the peak RSS of each worker after a burst of 1 MiB bodies.

It is a benchmark, not a test: CI does not run it. The machine is shared, so
quote medians of several repeats from runs whose "others" column is near zero.
``--code DIR`` runs the service from another tree (``git archive COMMIT | tar
-x -C DIR``) for a before and after; ``--profile DIR`` records py-spy profiles
and summarizes them with bench/profiles.py.
"""

import argparse
import collections
import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import gunicorn

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FLOOR = ROOT / "bench" / "floor.py"
PATH = "/api/analytics"
MIB = 1024 * 1024
# The ratios issue 3 asks of the service, by batch size.
GOALS = {1: 0.67, 10: 0.68, 100: 0.40}
RSS_GOAL_MIB = 64
# Room in the stdout pipe, so that the harness reading it never paces the server.
PIPE_BYTES = MIB
WRK_MARK = "BENCH_RESULT "
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

WRK_SCRIPT = """\
-- Written by bench/run.py: POST one prepared body; report the summary as one JSON line.
local file = assert(io.open(__BODY__, "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = "application/json"
__HEADERS__
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "__MARK__{\\"requests\\": %d, \\"duration_us\\": %d, \\"bytes\\": %d, \\"status_errors\\": %d, "
      .. "\\"connect_errors\\": %d, \\"read_errors\\": %d, \\"write_errors\\": %d, \\"timeouts\\": %d, "
      .. "\\"p50_us\\": %d, \\"p90_us\\": %d, \\"p99_us\\": %d, \\"max_us\\": %d}\\n",
    summary.requests, summary.duration, summary.bytes, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


class BenchError(Exception):
    """The harness could not measure: a server did not start, or answered wrongly."""


# ---------------------------------------------------------------- payloads


_PAGES = ["/", "/pricing", "/docs/api", "/blog/routes", "/products/4512", "/checkout"]
_QUERIES = ["rate limits", "gzip", "sessions", "pricing", "webhooks"]
_START = datetime(2024, 5, 20, 14, 32, tzinfo=UTC)


def _payload(kind: str, rng: random.Random) -> dict[str, Any]:
    """A few keys, as a browser's tracker sends them for each kind of event."""
    if kind == "page_view":
        return {"path": rng.choice(_PAGES), "ref": "google"}
    if kind == "click":
        return {"target": "buy", "x": rng.randrange(1280), "y": rng.randrange(800)}
    return {"q": rng.choice(_QUERIES), "hits": rng.randrange(100)}


def make_event(rng: random.Random, index: int = 0) -> dict[str, Any]:
    """One realistic event of about 150 to 200 bytes as compact JSON."""
    kind = rng.choice(["page_view", "click", "search_query"])
    stamp = _START + timedelta(milliseconds=1000 * index + rng.randrange(1000))
    return {
        "type": kind,
        "payload": _payload(kind, rng),
        "userId": f"u_{rng.randrange(10**6):06d}",
        "sessionId": f"s_{rng.getrandbits(32):08x}",
        "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "timestamp": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }


def _dumps(value: Any) -> bytes:
    """Compact JSON, as a browser's JSON.stringify writes it."""
    return json.dumps(value, separators=(",", ":")).encode()


def make_body(batch: int, seed: int = 3) -> bytes:
    """A request body of ``batch`` events, the same for every request of a run."""
    rng = random.Random(seed)
    events = [make_event(rng, index) for index in range(batch)]
    return _dumps({"timestamp": "2024-05-20T14:32:00.000Z", "events": events})


def make_large_body(limit: int = MIB, count: int = 1000, seed: int = 3) -> bytes:
    """A valid batch of ``count`` events (the default MAX_EVENTS) just under ``limit`` bytes (MAX_BODY_BYTES)."""
    rng = random.Random(seed)
    events = [make_event(rng, index) for index in range(count)]
    for event in events:
        event["payload"]["text"] = ""
    spare = limit - len(_dumps({"events": events})) - 64
    filler = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * (spare // count // 57 + 1)
    for event in events:
        event["payload"]["text"] = filler[: spare // count]
    body = _dumps({"events": events})
    assert limit - 4096 < len(body) <= limit, len(body)
    return body


# ---------------------------------------------------------------- servers


@dataclass(frozen=True)
class ServerSpec:
    """Which server to run: the floor, or the service with a worker class."""

    kind: str
    worker_class: str = "sync"
    threads: int = 1

    @property
    def label(self) -> str:
        if self.kind == "floor":
            return "floor"
        if self.worker_class == "gthread":
            return f"service (gthread, {self.threads} threads)"
        return f"service ({self.worker_class})"

    @property
    def slug(self) -> str:
        return "floor" if self.kind == "floor" else f"service-{self.worker_class}{self.threads}"


FLOOR_SPEC = ServerSpec("floor")


def parse_service(text: str) -> ServerSpec:
    """``sync`` or ``gthread:THREADS`` (``gthread`` alone is 4 threads) as a service spec."""
    worker_class, _, threads = text.partition(":")
    if worker_class == "sync" and not threads:
        return ServerSpec("service")
    if worker_class == "gthread":
        count = int(threads or 4)
        if count < 1:
            raise argparse.ArgumentTypeError("gthread needs at least one thread")
        return ServerSpec("service", "gthread", count)
    raise argparse.ArgumentTypeError(f"expected sync or gthread:N, not {text!r}")


def free_port() -> int:
    """A loopback port nobody is listening on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LineCounter:
    """Drains a server's stdout pipe in a thread, counting lines without keeping them."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lines = 0
        self.bytes = 0
        self.partial = False
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while chunk := os.read(self.fd, MIB):
            self.lines += chunk.count(b"\n")
            self.bytes += len(chunk)
            self.partial = not chunk.endswith(b"\n")
        os.close(self.fd)

    def settle(self, quiet: float = 0.5, timeout: float = 30.0) -> int:
        """The line count once no line has arrived for ``quiet`` seconds (requests in flight are done)."""
        deadline = time.monotonic() + timeout
        last, since = self.bytes, time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            if self.bytes != last:
                last, since = self.bytes, time.monotonic()
            elif time.monotonic() - since >= quiet and not self.partial:
                return self.lines
        raise BenchError("the server's stdout did not settle")

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


class Server:
    """One gunicorn (master and one worker) pinned to a CPU, its stdout counted through a pipe."""

    def __init__(self, spec: ServerSpec, workdir: Path, cpu: int | None, code: Path = ROOT) -> None:
        self.spec = spec
        self.code = code
        self.port = free_port()
        self.stderr_path = workdir / f"{spec.slug}.stderr"
        self.cpu = cpu
        self.process: subprocess.Popen | None = None
        self.counter: LineCounter | None = None

    def command(self) -> list[str]:
        """The command line: the floor's own script, or gunicorn with the production gunicorn.conf.py."""
        bind = f"127.0.0.1:{self.port}"
        if self.spec.kind == "floor":
            command = [sys.executable, str(FLOOR), "--bind", bind]
        else:
            command = [str(BIN / "gunicorn"), "wsgi:app", "--bind", bind]
        return (["taskset", "-c", str(self.cpu)] if self.cpu is not None else []) + command

    def environment(self) -> dict[str, str]:
        """One worker; the worker class through GUNICORN_CMD_ARGS, which overrides gunicorn.conf.py."""
        env = {key: value for key, value in os.environ.items() if key != "GUNICORN_CMD_ARGS"}
        env["PORT"] = str(self.port)
        env["WEB_CONCURRENCY"] = "1"
        if self.spec.kind == "service":
            args = f"--worker-class {self.spec.worker_class}"
            if self.spec.worker_class == "gthread":
                args += f" --threads {self.spec.threads}"
            env["GUNICORN_CMD_ARGS"] = args
        return env

    def start(self) -> None:
        """Start the server without waiting for it (see ``wait_ready``)."""
        read_end, write_end = os.pipe()
        with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size for this user: keep the default
            fcntl.fcntl(read_end, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        with self.stderr_path.open("wb") as stderr:
            self.process = subprocess.Popen(
                self.command(),
                cwd=self.code,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=write_end,
                stderr=stderr,
                start_new_session=True,
            )
        os.close(write_end)
        self.counter = LineCounter(read_end)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until /healthz answers 200."""
        assert self.process
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"{self.spec.label} exited:\n{self.stderr_tail()}")
            try:
                status, _ = self.request("GET", "/healthz", timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise BenchError(f"{self.spec.label} did not start:\n{self.stderr_tail()}")

    def stderr_tail(self, lines: int = 20) -> str:
        """The end of the server's stderr, for error messages."""
        try:
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PATH}"

    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 30) -> tuple[int, Any]:
        """One request; returns the status and the parsed JSON body."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, json.loads(response.read() or b"null")
        finally:
            connection.close()

    def check(self, body: bytes, batch: int) -> None:
        """The answer must be 200 ``{"success": true, "received": batch}``, nothing else."""
        status, answer = self.request("POST", PATH, body)
        if status != 200 or answer != {"success": True, "received": batch}:
            raise BenchError(f"{self.spec.label} answered {status} {answer!r} to a batch of {batch}")

    def worker_pid(self) -> int:
        """The pid of the one worker: the master's only child."""
        assert self.process
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if len(children) != 1:
            raise BenchError(f"{self.spec.label}: expected one worker, found {children}")
        return int(children[0])

    def cpu_seconds(self) -> float:
        """CPU time (user and system, all threads) the worker has used so far."""
        stat = Path(f"/proc/{self.worker_pid()}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def memory_kib(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak RSS) of the worker, in KiB."""
        status = Path(f"/proc/{self.worker_pid()}/status").read_text()
        return {key: int(value.split()[0]) for key, value in re.findall(r"^(VmRSS|VmHWM):\s+(.*)$", status, re.M)}

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to the whole session if it lingers; the stdout reader ends with it."""
        if not self.process:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        if self.counter:
            self.counter.join(10)


# ---------------------------------------------------------------- wrk


@dataclass
class WrkResult:
    """wrk's summary of one run."""

    requests: int
    duration_us: int
    bytes: int
    status_errors: int
    connect_errors: int
    read_errors: int
    write_errors: int
    timeouts: int
    p50_us: int
    p90_us: int
    p99_us: int
    max_us: int

    @property
    def rps(self) -> float:
        return self.requests / (self.duration_us / 1e6)

    @property
    def socket_errors(self) -> int:
        return self.connect_errors + self.read_errors + self.write_errors + self.timeouts


def wrk_script(body_path: Path, headers: dict[str, str] | None = None) -> str:
    """The Lua script that POSTs the body in ``body_path`` and prints the summary line."""
    lines = [f"wrk.headers[{json.dumps(key)}] = {json.dumps(value)}" for key, value in (headers or {}).items()]
    return (
        WRK_SCRIPT.replace("__BODY__", json.dumps(str(body_path)))
        .replace("__HEADERS__", "\n".join(lines))
        .replace("__MARK__", WRK_MARK)
    )


def parse_wrk(output: str) -> WrkResult:
    """wrk's summary from the line the script's ``done`` hook printed."""
    for line in output.splitlines():
        if line.startswith(WRK_MARK):
            return WrkResult(**json.loads(line[len(WRK_MARK) :]))
    raise BenchError(f"no summary in wrk's output:\n{output}")


def run_wrk(url: str, script: Path, duration: int, args: argparse.Namespace) -> WrkResult:
    """Run wrk against ``url`` for ``duration`` seconds, pinned to the load CPU."""
    command = ["wrk", f"-t{args.wrk_threads}", f"-c{args.connections}", f"-d{duration}s", "--timeout", "10s"]
    command += ["-s", str(script), url]
    if args.load_cpu is not None:
        command = ["taskset", "-c", str(args.load_cpu), *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60)
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


# ---------------------------------------------------------------- measuring


@dataclass
class Measurement:
    """One server at one batch size in one repeat."""

    server: str
    batch: int
    repeat: int
    wrk: WrkResult
    logged: int
    acknowledged: int
    cpu_seconds: float
    wall_seconds: float
    cpu_busy: float
    problems: list[str] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.wrk.rps

    @property
    def cpu_us(self) -> float:
        """Worker CPU time per request it handled: steadier than requests/s when other work shares the CPU."""
        handled = self.logged // self.batch
        return 1e6 * self.cpu_seconds / handled if handled else float("nan")

    @property
    def others(self) -> float:
        """The share of the server's CPU that other processes (and interrupts) took during the run."""
        return max(0.0, self.cpu_busy - self.busy)

    @property
    def busy(self) -> float:
        """The share of the wall time the worker was on a CPU."""
        return self.cpu_seconds / self.wall_seconds if self.wall_seconds else float("nan")

    @property
    def eps(self) -> float:
        return self.wrk.rps * self.batch


def count_problems(result: WrkResult, logged: int, batch: int, connections: int) -> tuple[int, list[str]]:
    """The events acknowledged, and what is wrong with the run's accounting.

    Every acknowledged event must be on stdout. A few more may be: requests that
    were in flight when wrk stopped (one per connection) or lost to a socket error
    were handled by the server but never counted by wrk.
    """
    problems = []
    if result.status_errors:
        problems.append(f"{result.status_errors} answers were not 2xx")
    acknowledged = (result.requests - result.status_errors) * batch
    unseen = (connections + result.socket_errors) * batch
    if logged < acknowledged:
        problems.append(f"only {logged} event lines for {acknowledged} acknowledged events")
    elif logged > acknowledged + unseen:
        problems.append(f"{logged} event lines for {acknowledged} acknowledged events (at most {unseen} unseen)")
    if logged % batch:
        problems.append(f"{logged} event lines is not a whole number of batches of {batch}")
    return acknowledged, problems


@contextmanager
def profiling(server: Server, args: argparse.Namespace, name: str, duration: int) -> Iterator[None]:
    """Record the worker with py-spy for ``duration`` seconds while the block runs, if --profile was given."""
    if not args.profile:
        yield
        return
    output = args.profile / f"{name}.txt"
    args.profiled.append(output)
    command = [args.py_spy, "record", "--pid", str(server.worker_pid()), "--rate", str(args.profile_rate)]
    command += ["--duration", str(duration), "--format", "raw", "--output", str(output)]
    if not args.profile_python_only:
        command.append("--native")
    spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield
    finally:
        try:
            _, err = spy.communicate(timeout=duration + 60)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate()
        if spy.returncode != 0:
            print(f"py-spy failed for {name}: {err.strip()}", file=sys.stderr)


def cpu_times(cpu: int | None) -> tuple[int, int]:
    """Total and idle clock ticks of one CPU (of all of them when None) so far, from /proc/stat."""
    name = "cpu" if cpu is None else f"cpu{cpu}"
    for line in Path("/proc/stat").read_text().splitlines():
        fields = line.split()
        if fields[0] == name:
            ticks = [int(value) for value in fields[1:8]]
            return sum(ticks), ticks[3] + ticks[4]
    raise BenchError(f"no {name} in /proc/stat")


def measure(server: Server, body: Path, batch: int, repeat: int, args: argparse.Namespace) -> Measurement:
    """Check the answer, warm up, measure, and check the event lines against the acknowledged events."""
    assert server.counter
    server.check(body.read_bytes(), batch)
    script = args.workdir / f"b{batch}.lua"
    if args.warmup:
        run_wrk(server.url, script, args.warmup, args)
    worker = server.worker_pid()
    before = server.counter.settle(args.settle)
    cpu, wall, core = server.cpu_seconds(), time.monotonic(), cpu_times(args.server_cpu)
    name = f"{server.spec.slug}-b{batch}-r{repeat}"
    with profiling(server, args, name, args.duration):
        result = run_wrk(server.url, script, args.duration, args)
    wall = time.monotonic() - wall
    cpu = server.cpu_seconds() - cpu
    core = [after - before for before, after in zip(core, cpu_times(args.server_cpu), strict=True)]
    logged = server.counter.settle(args.settle) - before
    acknowledged, problems = count_problems(result, logged, batch, args.connections)
    if server.worker_pid() != worker:
        problems.append("the worker was replaced during the run")
    busy = 1 - core[1] / core[0] if core[0] else float("nan")
    return Measurement(server.spec.label, batch, repeat, result, logged, acknowledged, cpu, wall, busy, problems)


def measure_rss(server: Server, body: bytes, events: int, args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of the worker after a burst of 1 MiB bodies, as many at a time as it has threads."""
    assert server.counter
    before = server.counter.settle(args.settle)
    idle = server.memory_kib()

    def post(_: int) -> tuple[int, Any]:
        return server.request("POST", PATH, body, timeout=60)

    with ThreadPoolExecutor(max_workers=server.spec.threads) as pool:
        answers = list(pool.map(post, range(args.rss_requests)))
    problems = [f"{status} {answer!r}" for status, answer in answers if answer != {"success": True, "received": events}]
    logged = server.counter.settle(args.settle) - before
    if logged != events * args.rss_requests:
        problems.append(f"{logged} event lines for {events * args.rss_requests} events")
    after = server.memory_kib()
    return {
        "server": server.spec.label,
        "events": events,
        "rss_before_kib": idle["VmRSS"],
        "hwm_kib": after["VmHWM"],
        "problems": problems,
    }


# ---------------------------------------------------------------- report


def cost_model(points: dict[int, float]) -> tuple[float, float] | None:
    """Least-squares fit of µs per request = a + b * batch: (a, b), the fixed cost and the cost per event."""
    if len(points) < 2:
        return None
    slope, intercept = statistics.linear_regression(list(points), list(points.values()))
    return intercept, slope


def _goal(label: str, batch: int, ratio: float) -> str:
    if label == "floor" or batch not in GOALS:
        return ""
    return f"≥ {GOALS[batch]:.2f} {'yes' if ratio >= GOALS[batch] else 'NO'}"


def _ratio(values: list[float]) -> str:
    """The median of paired ratios, with their range when there are several."""
    if not values:
        return "-"
    spread = f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ""
    return f"{statistics.median(values):.2f}{spread}"


def summarize(measurements: list[Measurement], labels: list[str], batches: list[int], repeats: int) -> str:
    """The table: medians over repeats; ratios are to the floor at the same batch in the same repeat."""
    floor = {(m.batch, m.repeat): m for m in measurements if m.server == "floor"}
    groups: dict[tuple[str, int], list[Measurement]] = collections.defaultdict(list)
    for m in measurements:
        groups[(m.server, m.batch)].append(m)
    rows = [
        "| server | batch | requests/s | events/s | p50 ms | p99 ms | ratio to floor | goal "
        "| worker CPU µs/request | CPU ratio | CPU use: worker / others |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for label in labels:
        for batch in batches:
            runs = groups.get((label, batch), [])
            if not runs:
                continue
            pairs = [(m, floor[(batch, m.repeat)]) for m in runs if (batch, m.repeat) in floor]
            ratios = [m.rps / f.rps for m, f in pairs]
            ratio = statistics.median(ratios) if ratios else float("nan")
            rows.append(
                f"| {label} | {batch} | {statistics.median(m.rps for m in runs):,.0f} "
                f"| {statistics.median(m.eps for m in runs):,.0f} "
                f"| {statistics.median(m.wrk.p50_us for m in runs) / 1000:.2f} "
                f"| {statistics.median(m.wrk.p99_us for m in runs) / 1000:.2f} "
                f"| {_ratio(ratios)} | {_goal(label, batch, ratio)} "
                f"| {statistics.median(m.cpu_us for m in runs):,.0f} "
                f"| {_ratio([f.cpu_us / m.cpu_us for m, f in pairs])} "
                f"| {100 * statistics.median(m.busy for m in runs):.0f}% / "
                f"{100 * statistics.median(m.others for m in runs):.0f}% |"
            )
    lines = ["\n".join(rows), ""]
    lines.append(
        f"Medians of {repeats} repeat(s). Ratio: requests/s over the floor's at that batch in the same repeat "
        "(range over repeats in brackets). CPU ratio: the floor's worker CPU time per request over this one's, "
        "which other load on the machine disturbs less. CPU use: the share of the server CPU's time the worker used, "
        "and what other processes took (on a quiet machine, under 5%)."
    )
    costs = []
    for label in labels:
        present = [b for b in batches if groups.get((label, b))]
        wall = {b: 1e6 / statistics.median(m.rps for m in groups[(label, b)]) for b in present}
        cpu = {b: statistics.median(m.cpu_us for m in groups[(label, b)]) for b in present}
        models = [(kind, cost_model(points)) for kind, points in (("wall", wall), ("CPU", cpu))]
        text = "; ".join(f"{kind} {m[0]:.0f} µs per request + {m[1]:.2f} µs per event" for kind, m in models if m)
        if text:
            costs.append(f"- {label}: {text}")
    if costs:
        lines.append("Cost per request and per event, least squares over the batch sizes (wall from requests/s; CPU):")
        lines += costs
    return "\n".join(lines)


def code_version(code: Path = ROOT) -> str:
    """The commit, and a digest of the uncommitted changes to the service if there are any."""
    if not (code / ".git").exists():
        return f"{code} (not a git checkout)"
    git = ["git", "-C", str(code)]
    service = ["analytics", "app.py", "config.py", "gunicorn.conf.py", "wsgi.py"]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        changed = subprocess.run([*git, "status", "--porcelain", "--", *service], capture_output=True, text=True)
        diff = subprocess.run([*git, "diff", "HEAD", "--", *service], capture_output=True).stdout
    except OSError:
        return "?"
    if not changed.stdout:
        return head
    return f"{head} + {len(changed.stdout.splitlines())} changed files (diff {hashlib.sha1(diff).hexdigest()[:8]})"


def machine(code: Path = ROOT) -> dict[str, str]:
    """What the numbers were measured on."""
    model = ""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line), "")
    except (OSError, subprocess.SubprocessError):
        pass
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=10)
    wrk_version = (wrk.stdout or wrk.stderr or "?").splitlines()[0].split(" [")[0]
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "python": platform.python_version(),
        "gunicorn": gunicorn.__version__,
        "wrk": wrk_version,
        "kernel": platform.release(),
        "code": code_version(code),
    }


def load_average() -> str:
    """The 1/5/15-minute load average: the machine is shared, so say how busy it was."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; the defaults are the issue's yardstick."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=15, help="seconds measured per run (default 15)")
    parser.add_argument("--warmup", type=int, default=5, help="seconds of load before each run (default 5; 0: none)")
    parser.add_argument("--batches", default="1,10,100", help="events per request, comma-separated (default 1,10,100)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of everything; the table has medians")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument(
        "--service",
        type=parse_service,
        action="append",
        help="worker class of a service to measure: sync or gthread:THREADS; repeat to compare (default sync)",
    )
    parser.add_argument(
        "--connection-close",
        action="store_true",
        help="send Connection: close, so keep-alive workers reconnect every request too (a proxy without pooling)",
    )
    parser.add_argument(
        "--settle", type=float, default=0.5, help="seconds without a new event line that mean the server is done"
    )
    parser.add_argument("--rss-requests", type=int, default=20, help="1 MiB requests in the RSS burst (0: skip)")
    parser.add_argument("--profile", type=Path, help="record each measured run with py-spy into this folder")
    parser.add_argument("--profile-rate", type=int, default=250, help="py-spy samples per second (default 250)")
    parser.add_argument(
        "--profile-python-only", action="store_true", help="py-spy without --native (orjson then counts as its caller)"
    )
    parser.add_argument("--server-cpu", type=int, default=0, help="CPU of the servers (default 0)")
    parser.add_argument("--load-cpu", type=int, default=1, help="CPU of wrk and this harness (default 1)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin anything to a CPU")
    parser.add_argument(
        "--code",
        type=Path,
        default=ROOT,
        help="run the service from this tree, e.g. an older commit: git archive COMMIT | tar -x -C DIR",
    )
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results", help="where raw results go")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.services = args.service or [ServerSpec("service")]
    if args.no_pin or (os.cpu_count() or 1) < 2:
        args.server_cpu = args.load_cpu = None
    if args.profile:
        args.py_spy = shutil.which("py-spy", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        if not args.py_spy:
            parser.error("--profile needs py-spy: .venv/bin/pip install py-spy")
        args.profile.mkdir(parents=True, exist_ok=True)
    args.profiled = []
    if not shutil.which("wrk"):
        parser.error("wrk is not installed: apt-get install wrk")
    return args


def run(args: argparse.Namespace) -> tuple[list[Measurement], list[dict[str, Any]]]:
    """Start every server, measure each batch size on each in turn, then the RSS burst; stop them all."""
    specs = [FLOOR_SPEC, *args.services]
    headers = {"Connection": "close"} if args.connection_close else {}
    for batch in args.batches:
        body = args.workdir / f"b{batch}.json"
        body.write_bytes(make_body(batch))
        (args.workdir / f"b{batch}.lua").write_text(wrk_script(body, headers))
    measurements: list[Measurement] = []
    memory: list[dict[str, Any]] = []
    with ExitStack() as stack:
        servers = []
        for spec in specs:
            server = Server(spec, args.workdir, args.server_cpu, args.code.resolve())
            stack.callback(server.stop)
            server.start()
            servers.append(server)
        for server in servers:
            server.wait_ready()
        for repeat in range(args.repeats):
            # Alternate the order, so that drift on a shared machine does not favour one server.
            order = servers if repeat % 2 == 0 else servers[::-1]
            for batch in args.batches:
                for server in order:
                    m = measure(server, args.workdir / f"b{batch}.json", batch, repeat, args)
                    measurements.append(m)
                    status = "; ".join(m.problems) or "ok"
                    print(
                        f"  repeat {repeat + 1} {m.server:32} batch {batch:4}: {m.rps:9,.0f} req/s "
                        f"p50 {m.wrk.p50_us / 1000:6.2f} ms p99 {m.wrk.p99_us / 1000:6.2f} ms, "
                        f"worker {100 * m.busy:3.0f}% others {100 * m.others:3.0f}% of its CPU, "
                        f"{m.logged} lines for {m.acknowledged} acked events: {status}",
                        flush=True,
                    )
        if args.rss_requests:
            large = make_large_body()
            events = len(json.loads(large)["events"])
            for server in servers:
                memory.append(measure_rss(server, large, events, args))
    return measurements, memory


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the table; exit 1 if any check failed."""
    args = parse_args(argv)
    if args.load_cpu is not None:
        # wrk, the stdout readers and py-spy stay off the servers' CPU.
        os.sched_setaffinity(0, {args.load_cpu})
    info = machine(args.code.resolve())
    command = "bench/run.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"command: {command}")
    print("machine: " + ", ".join(f"{key} {value}" for key, value in info.items()))
    print(f"load average before: {load_average()}", flush=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-") as workdir:
        args.workdir = Path(workdir)
        try:
            measurements, memory = run(args)
        except (BenchError, OSError, subprocess.SubprocessError) as error:
            print(f"benchmark failed: {error}", file=sys.stderr)
            return 1
    labels = [spec.label for spec in [FLOOR_SPEC, *args.services]]
    print()
    print(summarize(measurements, labels, args.batches, args.repeats))
    for entry in memory:
        status = "; ".join(entry["problems"]) or "ok"
        goal = "" if entry["server"] == "floor" else f" (goal < {RSS_GOAL_MIB} MiB)"
        print(
            f"- {entry['server']}: peak RSS {entry['hwm_kib'] / 1024:.1f} MiB{goal} after {args.rss_requests} "
            f"bodies of 1 MiB ({entry['events']} events each); "
            f"{entry['rss_before_kib'] / 1024:.1f} MiB before them: {status}"
        )
    problems = [m for m in measurements if m.problems] + [e for e in memory if e["problems"]]
    print(f"event lines: {'every acknowledged event was logged' if not problems else 'CHECKS FAILED, see above'}")
    print(f"load average after: {load_average()}; took {time.monotonic() - started:.0f} s")
    save(args, info, command, measurements, memory)
    if args.profile:
        # Profiled runs are slower (py-spy pauses the worker for each sample): read them for shares, not speed.
        print(f"\nprofiles in {args.profile} (py-spy raw format; speedscope.app opens them):", flush=True)
        subprocess.run([sys.executable, str(ROOT / "bench" / "profiles.py"), *map(str, args.profiled)])
    return 1 if problems else 0


def save(
    args: argparse.Namespace,
    info: dict[str, str],
    command: str,
    measurements: list[Measurement],
    memory: list[dict[str, Any]],
) -> None:
    """Keep the raw numbers in bench/results/ (ignored by git) for later comparison."""
    try:
        args.results.mkdir(parents=True, exist_ok=True)
        path = args.results / f"run-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
        record = {
            "command": command,
            "machine": info,
            "measurements": [asdict(m) | {"rps": m.rps} for m in measurements],
            "memory": memory,
        }
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"raw results: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    except OSError as error:
        print(f"could not save raw results: {error}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
