"""The servers under load: the floor and the service, each one gunicorn worker pinned to a CPU.

A server's stdout is a pipe whose lines are counted, not kept; with the nats
sink, the events stored are counted in its stream instead. Its worker's CPU
time and memory are read from /proc.
"""

import contextlib
import fcntl
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench import MIB, ROOT, BenchError, settle
from bench.kafkastore import KafkaStore
from bench.natsstore import NatsStore

BIN = Path(sys.executable).parent
FLOOR = ROOT / "bench" / "floor.py"
PATH = "/api/analytics"
# Room in the stdout pipe, so that the harness reading it never paces the server.
PIPE_BYTES = MIB
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ServerSpec:
    """Which server to run: the floor, or the service with a worker class, a sink (ANALYTICS_SINKS) and maybe a
    variant: a name for further settings (ANALYTICS_<name>=<value> pairs) measured beside the same service without
    them."""

    kind: str
    worker_class: str = "sync"
    threads: int = 1
    sink: str = "stdout"
    variant: str = ""
    settings: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        if self.kind == "floor":
            return "floor"
        workers = f"gthread, {self.threads} threads" if self.worker_class == "gthread" else self.worker_class
        label = f"service ({workers})" if self.sink == "stdout" else f"service ({workers}, {self.sink} sink)"
        return f"{label} [{self.variant}]" if self.variant else label

    @property
    def slug(self) -> str:
        if self.kind == "floor":
            return "floor"
        slug = f"service-{self.worker_class}{self.threads}" + ("" if self.sink == "stdout" else f"-{self.sink}")
        return f"{slug}-{self.variant}" if self.variant else slug

    @property
    def baseline(self) -> "ServerSpec | None":
        """What this service is compared with: the same without its variant, else with the stdout sink."""
        if self.variant:
            return replace(self, variant="", settings=())
        if self.kind == "service" and self.sink != "stdout":
            return replace(self, sink="stdout")
        return None

    @property
    def stream(self) -> str:
        """The JetStream stream of a service with the nats sink."""
        return "BENCH_" + self.slug.replace("-", "_").upper()

    @property
    def subject(self) -> str:
        return "bench." + self.slug

    @property
    def topic(self) -> str:
        """The Kafka topic of a service with the kafka sink."""
        return "bench-" + self.slug


FLOOR_SPEC = ServerSpec("floor")


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
        settle(lambda: self.bytes, "the server's stdout", quiet, timeout, done=lambda: not self.partial)
        return self.lines

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


class Server:
    """One gunicorn (master and one worker) pinned to a CPU, its stdout counted through a pipe (or its stream)."""

    def __init__(
        self,
        spec: ServerSpec,
        workdir: Path,
        cpu: int | None,
        code: Path = ROOT,
        nats: NatsStore | None = None,
        kafka: KafkaStore | None = None,
    ) -> None:
        if (spec.sink == "nats") != (nats is not None):
            raise ValueError("a server with the nats sink, and only one, needs the NATS store")
        if (spec.sink == "kafka") != (kafka is not None):
            raise ValueError("a server with the kafka sink, and only one, needs the Kafka store")
        self.spec = spec
        self.code = code
        self.nats = nats
        self.kafka = kafka
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
        if self.nats:
            env["ANALYTICS_SINKS"] = self.spec.sink
            env["ANALYTICS_NATS_SERVERS"] = self.nats.url
            env["ANALYTICS_NATS_STREAM"] = self.spec.stream
            env["ANALYTICS_NATS_SUBJECT"] = self.spec.subject
        if self.kafka:
            env["ANALYTICS_SINKS"] = self.spec.sink
            env["ANALYTICS_KAFKA_BOOTSTRAP_SERVERS"] = self.kafka.bootstrap
            env["ANALYTICS_KAFKA_TOPIC"] = self.spec.topic
        for name, value in self.spec.settings:
            env[f"ANALYTICS_{name}"] = value
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
        """Wait until /healthz answers 200 (/readyz with the nats sink: once connected to it)."""
        assert self.process
        deadline = time.monotonic() + timeout
        probe = "/readyz" if self.nats or self.kafka else "/healthz"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"{self.spec.label} exited:\n{self.stderr_tail()}")
            try:
                status, _ = self.request("GET", probe, timeout=2)
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

    def stored(self, quiet: float) -> int:
        """The events the server has written so far, once it has written none for ``quiet`` seconds: lines on
        stdout, or messages stored in its stream with the nats sink."""
        if self.nats:
            return self.nats.settle(self.spec.stream, quiet)
        if self.kafka:
            return self.kafka.settle(self.spec.topic, quiet)
        assert self.counter
        return self.counter.settle(quiet)

    @property
    def written(self) -> str:
        """What ``stored`` counts, for messages."""
        return "events stored" if self.nats or self.kafka else "event lines"

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
