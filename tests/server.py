"""Real gunicorn for end-to-end tests: started on a free loopback port, its stdout read through a pipe."""

import http.client
import itertools
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = Path(sys.executable).with_name("gunicorn")


def strict_json(text: bytes | str) -> Any:
    """Parse JSON as RFC 8259 has it: NaN and Infinity, which Python allows, are errors."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def children(pid: int) -> set[int]:
    """The pids of the live processes whose parent is ``pid``, read from /proc."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name, in parentheses, may hold spaces: the fields after it are plain.
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            found.add(int(entry.name))
    return found


def tcp_sockets() -> list[tuple[int, int, str]]:
    """(local port, remote port, inode) of every TCP socket of this network namespace, IPv4 and IPv6."""
    sockets = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            sockets.append((int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16), inode))
    return sockets


def socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets process ``pid`` has open."""
    inodes = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def free_port() -> int:
    """A loopback port nobody is listening on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """gunicorn serving wsgi:app with the production gunicorn.conf.py.

    stdout is a pipe, as under systemd or a platform's log router, drained by a
    thread into ``stdout``; stderr goes to a file for the diagnostics. With
    ``stdout_fifo`` the pipe is a named one (``fifo``), so that a test can take
    the reader away (``disconnect_stdout``) and bring one back (``reconnect_stdout``);
    ``pause_stdout`` stops reading so that the pipe fills.
    """

    def __init__(
        self, tmp_path: Path, workers: int = 2, env: dict[str, str] | None = None, stdout_fifo: bool = False
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stderr_path = tmp_path / f"gunicorn-{self.port}.stderr"
        self.fifo = tmp_path / f"gunicorn-{self.port}.stdout" if stdout_fifo else None
        self.stdout = bytearray()
        # Set while the drain thread may read; the lock is held across each read, so
        # pause_stdout returns only once no read is under way.
        self._reading = threading.Event()
        self._reading.set()
        self._read_lock = threading.Lock()
        self._detach = False
        self._env = {
            **os.environ,
            "PORT": str(self.port),
            "WEB_CONCURRENCY": str(workers),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.process: subprocess.Popen | None = None

    def start(self) -> "Server":
        """Start gunicorn and wait until /healthz answers."""
        stdout: int = subprocess.PIPE
        if self.fifo:
            os.mkfifo(self.fifo)
            # The reader first, non-blocking, so that opening the writer does not wait.
            self._stdout_fd = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK)
            stdout = os.open(self.fifo, os.O_WRONLY)
        self.process = subprocess.Popen(
            [str(GUNICORN), "wsgi:app", "--bind", f"127.0.0.1:{self.port}"],
            cwd=ROOT,
            env=self._env,
            stdout=stdout,
            stderr=self.stderr_path.open("wb"),
        )
        if self.fifo:
            os.close(stdout)
        else:
            assert self.process.stdout
            self._stdout_fd = self.process.stdout.fileno()
        self._start_reader()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {self.stderr_path.read_text()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"gunicorn did not start: {self.stderr_path.read_text()}")

    def _start_reader(self) -> None:
        self._detach = False
        self._reading.set()
        self._reader = threading.Thread(target=self._drain, args=(self._stdout_fd,), daemon=True)
        self._reader.start()

    def _drain(self, fd: int) -> None:
        """Read stdout into ``self.stdout`` until every writer has closed it or the reader is detached."""
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while True:
            self._reading.wait()
            with self._read_lock:
                if self._detach:
                    return
                if not self._reading.is_set() or not poller.poll(50):
                    continue
                try:
                    chunk = os.read(fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    return
                self.stdout += chunk

    def pause_stdout(self) -> None:
        """Stop reading stdout (the pipe fills up); returns once no read is in progress."""
        self._reading.clear()
        with self._read_lock:
            pass

    def resume_stdout(self) -> None:
        """Read stdout again after ``pause_stdout``."""
        self._reading.set()

    def disconnect_stdout(self) -> None:
        """Close the only reader of the FIFO: gunicorn's stdout becomes a broken pipe."""
        assert self.fifo, "start the server with stdout_fifo=True"
        self._detach = True
        self._reading.set()
        self._reader.join(10)
        os.close(self._stdout_fd)

    def reconnect_stdout(self) -> None:
        """Open the FIFO for reading again: the pipe gunicorn still holds gets a reader."""
        assert self.fifo, "start the server with stdout_fifo=True"
        self._stdout_fd = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK)
        self._start_reader()

    def worker_pids(self) -> set[int]:
        """The pids of the master's child processes, its workers."""
        assert self.process
        return children(self.process.pid)

    def worker_serving(self, client_port: int) -> int | None:
        """The worker holding the connection from loopback port ``client_port``, if one has accepted it."""
        inodes = {inode for local, remote, inode in tcp_sockets() if local == self.port and remote == client_port}
        for pid in self.worker_pids():
            if inodes & socket_inodes(pid):
                return pid
        return None

    def wait_for_worker(self, client_port: int, timeout: float = 10) -> int:
        """The worker holding the connection from ``client_port``, once one has accepted it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = self.worker_serving(client_port)
            if pid:
                return pid
            time.sleep(0.02)
        raise AssertionError(f"no worker accepted the connection from port {client_port}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal gunicorn, wait for it to exit and for stdout to be read to its end."""
        assert self.process
        self.resume_stdout()
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            # Never leave a gunicorn behind: the test fails, but the machine stays clean.
            self.process.kill()
            self.process.wait()
            raise
        self._reader.join(timeout)
        return code

    def lines(self) -> list[dict[str, Any]]:
        """Every stdout line as JSON; fails the test on any line that is not a JSON object."""
        raw = bytes(self.stdout)
        assert raw == b"" or raw.endswith(b"\n"), "stdout ends in a partial line"
        return [strict_json(line) for line in raw.split(b"\n")[:-1]]

    def wait_for_lines(self, count: int, timeout: float = 10) -> list[dict[str, Any]]:
        """The stdout lines once there are at least ``count`` of them."""
        deadline = time.monotonic() + timeout

        def short() -> bool:
            # A batch can be half read from the pipe: wait for its last line to end too.
            return self.stdout.count(b"\n") < count or bool(self.stdout) and not self.stdout.endswith(b"\n")

        while short() and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.lines()

    def post(
        self, path: str, body: bytes, headers: dict[str, str] | None = None, timeout: float = 30
    ) -> tuple[int, dict[str, str], Any]:
        """POST raw bytes; return status, headers and the parsed JSON body (errors too)."""
        request = urllib.request.Request(self.url + path, data=body, headers=headers or {}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, dict(response.headers), json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), json.loads(error.read())


# Load: batches with known ids, sent concurrently, each outcome kept for the accounting.

MAX_EVENT_BYTES = 32 * 1024


@dataclass
class Batch:
    """A request body and what the service must make of it."""

    body: bytes
    # Events the service must accept, by id, as sent.
    accepted: dict[str, dict[str, Any]]
    # (index, id) of the events it must reject.
    rejected: list[tuple[int, str]]
    # Every id in the batch, accepted or not.
    ids: list[str]


@dataclass
class Outcome:
    """What one request got: a status and JSON body, or the connection error instead."""

    batch: Batch
    status: int | None = None
    body: Any = None
    request_id: str | None = None
    error: str | None = None


def sized_event(event_id: str, size: int) -> dict[str, Any]:
    """An event whose compact JSON, as the service measures it, is exactly ``size`` bytes."""
    event = {"type": "sized", "id": event_id, "payload": {"blob": ""}}
    event["payload"]["blob"] = "s" * (size - len(orjson.dumps(event)))
    assert len(orjson.dumps(event)) == size
    return event


def make_batches(count: int, tag: str, seed: int = 4) -> list[Batch]:
    """``count`` batches of mixed sizes: mostly small, some of hundreds of events, some with events
    at exactly MAX_EVENT_BYTES, a few with events to reject (one byte too large, or without a type)."""
    rng = random.Random(seed)
    batches = []
    for number in range(count):
        events: list[dict[str, Any]] = []
        invalid: set[int] = set()
        kind = rng.random()
        if kind < 0.55:
            sizes = [rng.randint(60, 600) for _ in range(rng.randint(1, 5))]
        elif kind < 0.8:
            sizes = [rng.randint(60, 300) for _ in range(rng.randint(20, 200))]
        elif kind < 0.92:
            sizes = [rng.randint(2_000, 16_000) for _ in range(rng.randint(1, 4))]
        else:
            sizes = [MAX_EVENT_BYTES] * rng.randint(1, 4)
        for index, size in enumerate(sizes):
            event_id = f"{tag}-{number}-{index}"
            if size == MAX_EVENT_BYTES and index == 1:
                events.append(sized_event(event_id, MAX_EVENT_BYTES + 1))
                invalid.add(index)
            elif kind > 0.5 and index == 3:
                events.append({"id": event_id, "payload": {"no": "type"}})
                invalid.add(index)
            else:
                events.append(sized_event(event_id, size))
        batches.append(
            Batch(
                body=orjson.dumps({"timestamp": 1_716_215_520_000 + number, "events": events}),
                accepted={event["id"]: event for index, event in enumerate(events) if index not in invalid},
                rejected=[(index, events[index]["id"]) for index in sorted(invalid)],
                ids=[event["id"] for event in events],
            )
        )
    return batches


def send(port: int, body: bytes, timeout: float = 30) -> tuple[int, dict[str, str], Any]:
    """POST ``body`` to /api/analytics on a new connection; raise OSError or HTTPException if it breaks."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/api/analytics", body, {"Content-Type": "application/json", "Connection": "close"})
        response = connection.getresponse()
        return response.status, dict(response.headers), json.loads(response.read())
    finally:
        connection.close()


def run_load(
    port: int,
    batches: list[Batch],
    concurrency: int = 32,
    after: tuple[int, Callable[[], None]] | None = None,
) -> list[Outcome]:
    """Send every batch, ``concurrency`` at a time; ``after=(n, action)`` runs ``action`` once n have answered."""
    outcomes = [Outcome(batch) for batch in batches]
    answered = itertools.count(1)

    def one(outcome: Outcome) -> None:
        try:
            outcome.status, headers, outcome.body = send(port, outcome.batch.body)
            outcome.request_id = headers.get("X-Request-ID")
        except (OSError, http.client.HTTPException, ValueError) as error:
            outcome.error = repr(error)
        if after and next(answered) == after[0]:
            after[1]()

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, outcomes))
    return outcomes


def expected_answer(batch: Batch) -> tuple[int, dict[str, Any]]:
    """The status and body (rejections by index and id only) the service owes ``batch``."""
    body: dict[str, Any] = {"success": True, "received": len(batch.accepted)}
    if batch.rejected:
        body["rejected"] = [list(entry) for entry in batch.rejected]
    return 200, body


def summarize(outcome: Outcome) -> tuple[int | None, Any]:
    """An outcome's status and body with each rejection reduced to [index, id], to compare with expected_answer."""
    body = outcome.body
    if isinstance(body, dict) and "rejected" in body:
        body = {**body, "rejected": [[entry["index"], entry.get("id")] for entry in body["rejected"]]}
    return outcome.status, body


class SlowUpload:
    """A POST to /api/analytics sent a piece at a time: a request in a worker's (or a proxy's) hands, unfinished."""

    def __init__(
        self, port: int, body: bytes, source: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source or "", 0))
        head = {
            "Host": f"127.0.0.1:{port}",
            "Content-Type": "application/json",
            "Content-Length": str(len(body)),
            "Connection": "close",
            **(headers or {}),
        }
        self.data = (
            b"POST /api/analytics HTTP/1.1\r\n"
            + "".join(f"{name}: {value}\r\n" for name, value in head.items()).encode()
            + b"\r\n"
            + body
        )
        self.sent = 0

    @property
    def port(self) -> int:
        """The client's own port, which names the connection on the server's side."""
        return self.sock.getsockname()[1]

    @property
    def done(self) -> bool:
        """Whether the whole request has been sent."""
        return self.sent == len(self.data)

    def send(self, size: int) -> None:
        """Send the next ``size`` bytes of the request (fewer at its end)."""
        part = self.data[self.sent : self.sent + size]
        self.sock.sendall(part)
        self.sent += len(part)

    def finish(self) -> tuple[int, dict[str, str], Any]:
        """Send the rest and read the answer; raise OSError or HTTPException if the connection breaks."""
        try:
            self.send(len(self.data))
            response = http.client.HTTPResponse(self.sock, method="POST")
            response.begin()
            return response.status, dict(response.headers), json.loads(response.read())
        finally:
            self.sock.close()
