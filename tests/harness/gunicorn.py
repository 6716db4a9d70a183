"""Real gunicorn for the tests: started on a free loopback port, its stdout read through a pipe."""

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import orjson

from tests.harness.lines import parse_lines, strict_json

ROOT = Path(__file__).resolve().parents[2]
GUNICORN = Path(sys.executable).with_name("gunicorn")
# The type of the events Server.fence sends; no test sends it itself.
FENCE = "test_fence"
# How the one line begins that gunicorn.conf.py's on_starting writes when a bad setting stops the start.
REFUSAL = "analytics: cannot start: "


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

    A server shared by several tests has lines of earlier tests arriving late (the
    drain thread reads after the answer went out): such tests read what they wrote
    between two fences (``fence`` and ``lines_since``), never by counting lines.
    """

    def __init__(
        self, tmp_path: Path, workers: int = 2, env: dict[str, str] | None = None, stdout_fifo: bool = False
    ) -> None:
        # Bound here and handed to gunicorn (--bind fd://N): a port only chosen here could be taken, by another
        # test run's server or by a client's outgoing connection, before gunicorn bound it.
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
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

    def start(self, timeout: float = 60) -> "Server":
        """Start gunicorn and wait until /healthz answers (a minute at most: starting is slow on a busy machine)."""
        stdout: int = subprocess.PIPE
        if self.fifo:
            os.mkfifo(self.fifo)
            # The reader first, non-blocking, so that opening the writer does not wait.
            self._stdout_fd = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK)
            stdout = os.open(self.fifo, os.O_WRONLY)
        with self._listener, self.stderr_path.open("wb") as stderr:
            self.process = subprocess.Popen(
                [str(GUNICORN), "wsgi:app", "--bind", f"fd://{self._listener.fileno()}"],
                cwd=ROOT,
                env=self._env,
                stdout=stdout,
                stderr=stderr,
                pass_fds=(self._listener.fileno(),),
            )
        if self.fifo:
            os.close(stdout)
        else:
            assert self.process.stdout
            self._stdout_fd = self.process.stdout.fileno()
        self._start_reader()
        deadline = time.monotonic() + timeout
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
        return parse_lines(bytes(self.stdout))

    def wait_for_lines(self, count: int, timeout: float = 10) -> list[dict[str, Any]]:
        """The stdout lines once there are at least ``count`` of them (or ``timeout`` passed).

        Only for a server one test has to itself: on a shared one, use ``fence``."""
        deadline = time.monotonic() + timeout

        def short() -> bool:
            # A batch can be half read from the pipe: wait for its last line to end too.
            return self.stdout.count(b"\n") < count or bool(self.stdout) and not self.stdout.endswith(b"\n")

        while short() and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.lines()

    def fence(self, timeout: float = 10) -> int:
        """Send an event of type FENCE and wait for its line; the number of stdout lines up to and including it.

        A worker writes a batch's lines before it answers, and a pipe keeps writes in order, so once
        the fence's line has been read so has every line of every request answered before the fence
        was sent: the lines after it are all later ones.
        """
        marker = uuid.uuid4().hex
        body = orjson.dumps({"events": [{"type": FENCE, "id": marker}]})
        status, _, answer = self.post("/api/analytics", body, {"Content-Type": "application/json"})
        assert (status, answer) == (200, {"success": True, "received": 1}), "the fence was not accepted"
        needle = f'"{marker}"'.encode()
        deadline = time.monotonic() + timeout
        while True:
            raw = bytes(self.stdout)
            at = raw.find(needle)
            end = raw.find(b"\n", at) if at >= 0 else -1
            if end >= 0:
                return raw.count(b"\n", 0, end + 1)
            assert time.monotonic() < deadline, f"the fence's line was not on stdout within {timeout} s"
            time.sleep(0.01)

    def lines_since(self, start: int) -> list[dict[str, Any]]:
        """The lines of the requests answered between the fence that returned ``start`` and now.

        Sends a closing fence, so the answer holds every line those requests wrote, and no line of
        another test's: the requests still in flight are the test's own to wait for.
        """
        end = self.fence()
        pieces = bytes(self.stdout).split(b"\n")
        return parse_lines(b"".join(piece + b"\n" for piece in pieces[start : end - 1]))

    def post(
        self, path: str, body: bytes, headers: dict[str, str] | None = None, timeout: float = 30
    ) -> tuple[int, dict[str, str], Any]:
        """POST raw bytes; return status, headers and the parsed JSON body (errors too)."""
        request = urllib.request.Request(self.url + path, data=body, headers=headers or {}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, dict(response.headers), strict_json(response.read())
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), strict_json(error.read())


def logged(server: Server, event_id: str, timeout: float = 10) -> dict[str, Any]:
    """The event line with ``event_id``, once it is on stdout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # Only whole lines: a large batch may be half read from the pipe right now.
        raw = bytes(server.stdout)
        for line in raw[: raw.rfind(b"\n") + 1].splitlines():
            event = strict_json(line)
            if event.get("id") == event_id:
                return event
        time.sleep(0.02)
    raise AssertionError(f"{event_id} not logged")


def run_gunicorn(env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    """Run gunicorn with four workers and ``env`` until it exits by itself, within ``timeout``: a start to refuse."""
    environment = {**os.environ, "WEB_CONCURRENCY": "4", "PORT": str(free_port()), **env}
    return subprocess.run(
        [str(GUNICORN), "wsgi:app"], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout
    )


def refusal(result: subprocess.CompletedProcess) -> str:
    """The one line with which gunicorn refused to start, checked to be all there is to read: exit status 1, that
    line once on stderr, gunicorn's own JSON lines beside it (no traceback), no worker booted, nothing on stdout.

    Before the settings were checked in the master, each worker failed on its own with a traceback and gunicorn
    ended with "Worker failed to boot", which buried the one line that matters.
    """
    lines = result.stderr.splitlines()
    refusals = [line for line in lines if line.startswith(REFUSAL)]
    assert (result.returncode, len(refusals)) == (1, 1), result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    others = [strict_json(line) for line in lines if not line.startswith(REFUSAL)]
    assert [line for line in others if "worker" in line["event"].lower()] == [], result.stderr
    assert result.stdout == ""
    return refusals[0]
