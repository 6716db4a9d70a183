"""Faults: stdout broken, blocked, full or closed, workers killed: no false 200, no torn line, no crash loop,
readiness that says so, recovery, no acknowledged loss."""

import errno
import fcntl
import http.client
import os
import shutil
import signal
import struct
import subprocess
import termios
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import pytest

from analytics.lines import most_written
from config import Config
from tests.harness.clients import SlowUpload, send
from tests.harness.gunicorn import GUNICORN, ROOT, Server, free_port
from tests.harness.lines import parse_lines, strict_json
from tests.harness.load import Outcome, expected_answer, make_batches, run_load, summarize

FAILED = (500, {"error": "Failed to process events"})
READY = (200, {"status": "ready"})
# Exactly a page: a pipe takes such a write whole into one free slot or refuses it, so
# when the next one is refused every slot is full and poll() no longer says writable.
FILLER = b'{"kind":"filler","pad":"' + b"x" * (4096 - 27) + b'"}\n'


def fill_pipe_once(fifo: Path) -> None:
    """Write one filler line into the FIFO."""
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, FILLER)
    finally:
        os.close(fd)


def fill_pipe(fifo: Path) -> int:
    """Write whole filler lines into the FIFO until it takes no more; the number written."""
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    written = 0
    try:
        while True:
            os.write(fd, FILLER)
            written += 1
    except BlockingIOError:
        return written
    finally:
        os.close(fd)


def batch_of(tag: str, count: int = 3) -> tuple[bytes, list[str]]:
    """A valid batch body and its event ids."""
    events = [{"type": "fault_probe", "id": f"{tag}-{n}", "payload": {"n": n}} for n in range(count)]
    return orjson.dumps({"events": events}), [event["id"] for event in events]


def post_many(port: int, tag: str, requests: int) -> tuple[list[tuple[int, dict]], list[str]]:
    """Send ``requests`` batches at once; their (status, body) answers and all their event ids."""
    batches = [batch_of(f"{tag}-{n}") for n in range(requests)]
    with ThreadPoolExecutor(max_workers=requests) as pool:
        answers = list(pool.map(lambda batch: send(port, batch[0])[::2], batches))
    return answers, [event_id for _, ids in batches for event_id in ids]


def wait_until(condition: Callable[[], bool], timeout: float = 20) -> None:
    """Poll ``condition`` until it holds; fail the test if it does not within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {condition.__doc__ or condition}"
        time.sleep(0.02)


def get(port: int, path: str) -> tuple[int, Any]:
    """GET ``path``; its status and parsed JSON body (errors too). OSError if nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, strict_json(response.read())
    except urllib.error.HTTPError as error:
        return error.code, strict_json(error.read())


def not_ready(reason: str) -> tuple[int, dict[str, str]]:
    """The /readyz answer of a service whose event log cannot take writes, for ``reason``."""
    return 503, {"error": "Not ready", "reason": reason}


def failures_logged(server: Any) -> list[str]:
    """The errors of the service's event_log_write_failed diagnostics on stderr."""
    found = []
    for raw in server.stderr_path.read_bytes().splitlines():
        try:
            line = strict_json(raw)
        except ValueError:
            continue
        if isinstance(line, dict) and line.get("event") == "event_log_write_failed":
            found.append(line["error"])
    return found


@pytest.mark.parametrize("fault", ["broken", "blocked"])
def test_stdout_fault_answers_500_then_recovers(start_server, fault):
    """stdout a broken pipe (reader gone) or blocked (reader stopped, pipe full): every batch gets 500, nothing
    of it is written, /readyz says why while /healthz stays ok, workers and master stay up; once stdout works
    again /readyz is ready and batches are accepted."""
    server = start_server(workers=2, stdout_fifo=True, env={"ANALYTICS_LOG_WRITE_TIMEOUT": "0.5"})
    body, before_ids = batch_of("before")
    assert send(server.port, body)[::2] == (200, {"success": True, "received": 3})
    server.wait_for_lines(3)
    # gunicorn spawns workers a random pause apart: the second may not be forked when the first answers.
    wait_until(lambda: len(server.worker_pids()) == 2)
    workers = server.worker_pids()
    assert get(server.port, "/readyz") == READY

    if fault == "broken":
        server.disconnect_stdout()
        reason = "stdout is not writable: nothing reads it (the other end is closed)"
    else:
        server.pause_stdout()
        fillers = fill_pipe(server.fifo)
        reason = "the stdout pipe is full (its reader has stalled)"
    # Several times, so that both workers are asked.
    assert [get(server.port, "/readyz") for _ in range(6)] == [not_ready(reason)] * 6
    assert get(server.port, "/healthz") == (200, {"status": "ok"})
    # More requests than workers, all at once: each worker fails several in a row and carries on.
    answers, failed_ids = post_many(server.port, "during", 6)
    assert answers == [FAILED] * 6
    assert server.process.poll() is None
    assert server.worker_pids() == workers, "a worker died or was replaced"
    assert len(failures_logged(server)) == 6
    if fault == "broken":
        server.reconnect_stdout()
    else:
        server.resume_stdout()

    wait_until(lambda: get(server.port, "/readyz") == READY)
    answers, after_ids = post_many(server.port, "after", 4)
    assert answers == [(200, {"success": True, "received": 3})] * 4
    assert server.worker_pids() == workers
    assert server.stop() == 0
    lines = server.lines()
    expected_kinds = {"event": 3 + 12} if fault == "broken" else {"event": 3 + 12, "filler": fillers}
    assert Counter(line["kind"] for line in lines) == expected_kinds
    assert sorted(line["id"] for line in lines if line["kind"] == "event") == sorted(before_ids + after_ids)
    assert not set(failed_ids) & {line.get("id") for line in lines}


def assert_exact(outcomes: list[Outcome]) -> list[str]:
    """Assert every outcome got its exact answer; the ids of the events they got acknowledged."""
    assert [summarize(o) for o in outcomes if summarize(o) != expected_answer(o.batch)] == []
    return [event_id for outcome in outcomes for event_id in outcome.batch.accepted]


def test_worker_killed_mid_upload_is_replaced_and_nothing_acknowledged_is_lost(start_server):
    """SIGKILL to the worker reading a request's body: that client gets a broken connection, never a 200;
    the other worker serves meanwhile, gunicorn replaces the dead one, and every acknowledged event is logged once."""
    server = start_server(workers=2)
    acknowledged = assert_exact(run_load(server.port, make_batches(100, tag="a"), concurrency=8))
    killed_body, killed_ids = batch_of("killed")
    upload = SlowUpload(server.port, killed_body)
    upload.send(len(upload.data) - 5)
    victim = server.wait_for_worker(upload.port)
    # One worker holds the unfinished upload; the other serves everyone else.
    acknowledged += assert_exact(run_load(server.port, make_batches(100, tag="b"), concurrency=8))

    os.kill(victim, signal.SIGKILL)
    with pytest.raises((OSError, http.client.HTTPException)):
        upload.finish()
    wait_until(lambda: len(server.worker_pids() - {victim}) == 2)
    acknowledged += assert_exact(run_load(server.port, make_batches(100, tag="c"), concurrency=8))
    assert server.stop() == 0

    logged = Counter(line["id"] for line in server.lines())
    assert sorted(logged) == sorted(acknowledged)
    assert set(logged.values()) == {1}
    assert not set(killed_ids) & logged.keys()


def lock_holder_exists(fifo: Path) -> bool:
    """Whether some process holds the POSIX record lock on the FIFO (the event log's lock)."""
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        return True
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def upload_to_another_worker(server: Server, body: bytes, avoid: int) -> SlowUpload:
    """An upload short of its last byte, held by a worker other than ``avoid`` (a threaded worker may take several)."""
    for _ in range(20):
        upload = SlowUpload(server.port, body)
        upload.send(len(upload.data) - 1)
        if server.wait_for_worker(upload.port) != avoid:
            return upload
        upload.sock.close()
    raise AssertionError(f"every connection went to worker {avoid}")


def test_worker_killed_holding_the_log_lock_does_not_block_the_others(start_server):
    """A worker waiting on a full stdout holds the log lock; SIGKILL it: the kernel drops the lock, the batch
    waiting behind it is written and acknowledged, the killed request's events are not written at all."""
    server = start_server(workers=2, stdout_fifo=True, env={"ANALYTICS_LOG_WRITE_TIMEOUT": "20"})
    body, warm_ids = batch_of("warm")
    assert send(server.port, body)[::2] == (200, {"success": True, "received": 3})
    server.wait_for_lines(3)
    server.pause_stdout()
    fillers = fill_pipe(server.fifo)

    holder_body, holder_ids = batch_of("holder")
    holder = SlowUpload(server.port, holder_body)
    holder_answer: list = []
    holder_thread = threading.Thread(target=lambda: holder_answer.append(catch(holder.finish)))
    holder_thread.start()
    victim = server.wait_for_worker(holder.port)
    wait_until(lambda: lock_holder_exists(server.fifo))
    waiter_body, waiter_ids = batch_of("waiter")
    waiter = upload_to_another_worker(server, waiter_body, victim)
    waiter_answer: list = []
    waiter_thread = threading.Thread(target=lambda: waiter_answer.append(catch(waiter.finish)))
    waiter_thread.start()

    os.kill(victim, signal.SIGKILL)
    server.resume_stdout()
    holder_thread.join(30)
    waiter_thread.join(30)
    assert isinstance(holder_answer[0], OSError | http.client.HTTPException), holder_answer
    assert waiter_answer[0][::2] == (200, {"success": True, "received": 3})
    wait_until(lambda: len(server.worker_pids() - {victim}) == 2)
    body, after_ids = batch_of("after")
    assert send(server.port, body)[::2] == (200, {"success": True, "received": 3})
    assert server.stop() == 0

    lines = server.lines()
    assert Counter(line["kind"] for line in lines) == {"event": 9, "filler": fillers}
    assert sorted(line["id"] for line in lines if line["kind"] == "event") == sorted(warm_ids + waiter_ids + after_ids)
    assert not set(holder_ids) & {line.get("id") for line in lines}


def catch(call: Callable[[], Any]) -> Any:
    """``call()``'s result, or the exception it raised."""
    try:
        return call()
    except Exception as error:
        return error


def unread_bytes(fifo: Path) -> int:
    """How many bytes wait in the FIFO for its reader."""
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]
    finally:
        os.close(fd)


def test_worker_killed_mid_write_tears_no_line(start_server):
    """A worker killed while its batch is half in the pipe: every line on stdout is still whole JSON, and the next
    acknowledged event is on a line of its own."""
    server = start_server(workers=2, stdout_fifo=True, env={"ANALYTICS_LOG_WRITE_TIMEOUT": "20"})
    body, warm_ids = batch_of("warm")
    assert send(server.port, body)[::2] == (200, {"success": True, "received": 3})
    server.wait_for_lines(3)
    server.pause_stdout()
    fd = os.open(server.fifo, os.O_WRONLY | os.O_NONBLOCK)
    capacity = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
    os.close(fd)
    # All but one page full: poll() says writable, and a batch of 90 KB then has to wait half-written.
    for _ in range(capacity // len(FILLER) - 1):
        fill_pipe_once(server.fifo)
    big = [{"type": "big", "id": f"big-{n}", "payload": {"blob": "b" * 30_000}} for n in range(3)]
    upload = SlowUpload(server.port, orjson.dumps({"events": big}))
    answer: list = []
    thread = threading.Thread(target=lambda: answer.append(catch(upload.finish)))
    thread.start()
    victim = server.wait_for_worker(upload.port)
    wait_until(lambda: lock_holder_exists(server.fifo))
    # Give the write the chance to start: the pipe is full once it has (a writer that waits for room never fills it).
    deadline = time.monotonic() + 3
    while unread_bytes(server.fifo) < capacity and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(victim, signal.SIGKILL)
    server.resume_stdout()
    thread.join(30)
    assert isinstance(answer[0], OSError | http.client.HTTPException), answer
    body, after_ids = batch_of("after")
    assert send(server.port, body)[::2] == (200, {"success": True, "received": 3})
    assert server.stop() == 0

    lines = server.lines()
    ids = {line.get("id") for line in lines}
    assert set(warm_ids + after_ids) <= ids


# stdout a file on a full disk: a tmpfs of DISK_BYTES mounted in a mount namespace of gunicorn's own.
DISK_BYTES = 8 * 1024 * 1024
PAGE = os.sysconf("SC_PAGE_SIZE")
# What the filler leaves free: less than the batch that is to fail, so that part of it is written.
ROOM = 2 * PAGE
# The room the stdout sink needs to be ready: the most one request can make it write.
MIN_FREE = most_written(Config.MAX_BODY_BYTES, Config.MAX_EVENTS)


class DiskServer:
    """gunicorn whose stdout is ``events.log`` on a tmpfs that only it sees; ``disk`` reaches it from outside."""

    def __init__(self, tmp_path: Path, redirect: str) -> None:
        self.port = free_port()
        self.stderr_path = tmp_path / f"gunicorn-{self.port}.stderr"
        mount_point = tmp_path / "disk"
        mount_point.mkdir()
        script = f'mount -t tmpfs -o size={DISK_BYTES} tmpfs "$0" && exec "$@" {redirect} "$0/events.log"'
        with self.stderr_path.open("wb") as stderr:
            self.process = subprocess.Popen(
                ["unshare", "--mount", "sh", "-c", script, str(mount_point)]
                + [str(GUNICORN), "wsgi:app", "--bind", f"127.0.0.1:{self.port}"],
                cwd=ROOT,
                env={**os.environ, "PORT": str(self.port), "WEB_CONCURRENCY": "2"},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        # unshare and sh exec what follows them: the pid is gunicorn's master, and its root its namespace's.
        self.disk = Path(f"/proc/{self.process.pid}/root{mount_point}")
        self.log = self.disk / "events.log"
        wait_until(self.answers)

    def answers(self) -> bool:
        """Whether /healthz answers; fails the test if gunicorn has exited."""
        assert self.process.poll() is None, self.stderr_path.read_text()
        try:
            return get(self.port, "/healthz") == (200, {"status": "ok"})
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if gunicorn is still there after 30 s: none is left behind."""
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


@pytest.fixture
def start_on_tmpfs(tmp_path: Path) -> Iterator[Callable[[str], DiskServer]]:
    """Start gunicorn with stdout redirected (``>`` or ``>>``) to a file on a small tmpfs; stopped afterwards."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("a tmpfs in a private mount namespace needs root and unshare(1)")
    probe = tmp_path / "probe"
    probe.mkdir()
    mounted = subprocess.run(
        ["unshare", "--mount", "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace: {mounted.stderr.strip()}")
    servers: list[DiskServer] = []

    def start(redirect: str) -> DiskServer:
        servers.append(DiskServer(tmp_path, redirect))
        return servers[-1]

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


def fill_disk(path: Path, leave: int) -> None:
    """Fill the filesystem with the file ``path``, then shorten it to leave ``leave`` bytes (whole pages) free."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        with pytest.raises(OSError) as full:
            while True:
                os.write(fd, bytes(64 * 1024))
        assert full.value.errno == errno.ENOSPC
        os.ftruncate(fd, os.fstat(fd).st_size - leave)
    finally:
        os.close(fd)


@pytest.mark.parametrize("redirect", [">", ">>"])
def test_full_disk_fails_the_batch_and_takes_back_what_it_wrote(start_on_tmpfs, redirect):
    """stdout a file (truncating or O_APPEND) on a full disk: a batch larger than the room left gets 500 and
    leaves nothing, not even the part the disk took, so the log still ends on a line boundary; /readyz says the
    disk is full; with room again the next batch is a 200, and every line of the file is one acknowledged event."""
    server = start_on_tmpfs(redirect)
    body, before_ids = batch_of("before")
    assert send(server.port, body)[::2] == (200, {"success": True, "received": 3})
    assert get(server.port, "/readyz") == READY
    logged = server.log.read_bytes()

    fill_disk(server.disk / "filler", leave=ROOM)
    assert get(server.port, "/readyz") == not_ready(
        f"{ROOM} bytes free on the filesystem of stdout, fewer than {MIN_FREE}"
    )
    big = [{"type": "big", "id": f"big-{n}", "payload": {"blob": "b" * ROOM}} for n in range(3)]
    assert send(server.port, orjson.dumps({"events": big}))[::2] == FAILED
    assert server.log.read_bytes() == logged
    assert failures_logged(server) == ["[Errno 28] No space left on device"]

    (server.disk / "filler").unlink()
    assert get(server.port, "/readyz") == READY
    body, after_ids = batch_of("after")
    assert send(server.port, body)[::2] == (200, {"success": True, "received": 3})
    lines = parse_lines(server.log.read_bytes())
    assert [line["id"] for line in lines] == before_ids + after_ids


def start_refused(tmp_path: Path, redirect: str, stdout: int | None = None) -> tuple[int, list[str]]:
    """Run gunicorn with its stdout redirected by the shell (``redirect``) or given (``stdout``);
    its exit code and stderr lines once it has exited (the test fails if it is still up after 60 s)."""
    port = free_port()
    stderr_path = tmp_path / "refused.stderr"
    with stderr_path.open("wb") as stderr:
        exited = subprocess.run(
            ["sh", "-c", f'exec "$@" {redirect}', "sh", str(GUNICORN), "wsgi:app", "--bind", f"127.0.0.1:{port}"],
            cwd=ROOT,
            env={**os.environ, "PORT": str(port), "WEB_CONCURRENCY": "2"},
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            timeout=60,
        )
    return exited.returncode, stderr_path.read_text().splitlines()


@pytest.mark.parametrize(
    "redirect, reason",
    [
        (">&-", "it is closed"),
        ("1</dev/null", "it is open for reading only"),
        ("", "nothing reads it (the other end is closed)"),
    ],
    ids=["closed", "read-only", "pipe-without-reader"],
)
def test_unwritable_stdout_stops_the_start_with_one_line(tmp_path, redirect, reason):
    """stdout closed, read-only or a pipe nobody reads: gunicorn exits non-zero at once, saying so in one line
    of stderr, rather than serving every batch a 500 while /healthz says ok. (The shell's redirection replaces
    the pipe given as stdout; with none, the pipe is stdout.)"""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        code, stderr = start_refused(tmp_path, redirect, stdout=write_end)
    finally:
        os.close(write_end)
    assert code != 0
    said = [line for line in stderr if "not writable" in line]
    assert len(said) == 1, stderr
    assert said[0].endswith(f"stdout (fd 1) is not writable: {reason}")
