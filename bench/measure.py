"""One measured run of wrk against a server, checked against the event lines it wrote; and the RSS burst."""

import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import BenchError
from bench.cli import Options
from bench.servers import PATH, Server
from bench.wrk import WrkResult, run_wrk


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


def count_problems(
    result: WrkResult, logged: int, batch: int, connections: int, written: str = "event lines"
) -> tuple[int, list[str]]:
    """The events acknowledged, and what is wrong with the run's accounting.

    Every acknowledged event must be on stdout (or in the stream: ``written``
    names which). A few more may be: requests that were in flight when wrk
    stopped (one per connection) or lost to a socket error were handled by the
    server but never counted by wrk.
    """
    problems = []
    if result.status_errors:
        problems.append(f"{result.status_errors} answers were not 2xx")
    acknowledged = (result.requests - result.status_errors) * batch
    unseen = (connections + result.socket_errors) * batch
    if logged < acknowledged:
        problems.append(f"only {logged} {written} for {acknowledged} acknowledged events")
    elif logged > acknowledged + unseen:
        problems.append(f"{logged} {written} for {acknowledged} acknowledged events (at most {unseen} unseen)")
    if logged % batch:
        problems.append(f"{logged} {written} is not a whole number of batches of {batch}")
    return acknowledged, problems


class Profiler:
    """py-spy recording the worker during each measured run (--profile); ``recorded`` lists its files."""

    def __init__(self, py_spy: str, folder: Path, rate: int, native: bool) -> None:
        self.py_spy = py_spy
        self.folder = folder
        self.rate = rate
        self.native = native
        self.recorded: list[Path] = []
        folder.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def record(self, server: Server, name: str, duration: int) -> Iterator[None]:
        """Record the worker with py-spy for ``duration`` seconds while the block runs."""
        output = self.folder / f"{name}.txt"
        self.recorded.append(output)
        command = [self.py_spy, "record", "--pid", str(server.worker_pid()), "--rate", str(self.rate)]
        command += ["--duration", str(duration), "--format", "raw", "--output", str(output)]
        if self.native:
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


def measure(
    server: Server, body: Path, script: Path, batch: int, repeat: int, options: Options, profiler: Profiler | None
) -> Measurement:
    """Check the answer, warm up, measure, and check the events written against the acknowledged events."""

    def load(duration: int) -> WrkResult:
        return run_wrk(server.url, script, duration, options.wrk_threads, options.connections, options.load_cpu)

    server.check(body.read_bytes(), batch)
    if options.warmup:
        load(options.warmup)
    worker = server.worker_pid()
    before = server.stored(options.settle)
    cpu, wall, core = server.cpu_seconds(), time.monotonic(), cpu_times(options.server_cpu)
    name = f"{server.spec.slug}-b{batch}-r{repeat}"
    with profiler.record(server, name, options.duration) if profiler else nullcontext():
        result = load(options.duration)
    wall = time.monotonic() - wall
    cpu = server.cpu_seconds() - cpu
    core = [after - before for before, after in zip(core, cpu_times(options.server_cpu), strict=True)]
    logged = server.stored(options.settle) - before
    acknowledged, problems = count_problems(result, logged, batch, options.connections, server.written)
    if server.worker_pid() != worker:
        problems.append("the worker was replaced during the run")
    busy = 1 - core[1] / core[0] if core[0] else float("nan")
    return Measurement(server.spec.label, batch, repeat, result, logged, acknowledged, cpu, wall, busy, problems)


def measure_rss(server: Server, bodies: Sequence[bytes], events: int, options: Options) -> dict[str, Any]:
    """Peak RSS of the worker after a burst of 1 MiB bodies (each with ``events`` events and ids of its own, so
    that none is a stream's duplicate), as many at a time as the worker has threads."""
    before = server.stored(options.settle)
    idle = server.memory_kib()

    def post(body: bytes) -> tuple[int, Any]:
        return server.request("POST", PATH, body, timeout=60)

    with ThreadPoolExecutor(max_workers=server.spec.threads) as pool:
        answers = list(pool.map(post, bodies))
    # An answer listing a thousand rejections is a megabyte: its start says enough.
    problems = [
        f"{status} {answer!r:.300}" for status, answer in answers if answer != {"success": True, "received": events}
    ]
    logged = server.stored(options.settle) - before
    if logged != events * len(bodies):
        problems.append(f"{logged} {server.written} for {events * len(bodies)} events")
    after = server.memory_kib()
    return {
        "server": server.spec.label,
        "events": events,
        "rss_before_kib": idle["VmRSS"],
        "hwm_kib": after["VmHWM"],
        "problems": problems,
    }
