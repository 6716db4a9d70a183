"""Faults: stdout broken or blocked, workers killed: no false 200, no crash loop, recovery, no acknowledged loss."""

import fcntl
import http.client
import os
import signal
import struct
import termios
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.harness.clients import SlowUpload, send
from tests.harness.gunicorn import Server
from tests.harness.lines import strict_json
from tests.harness.load import Outcome, expected_answer, make_batches, run_load, summarize

FAILED = (500, {"error": "Failed to process events"})
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


def failures_logged(server: Server) -> list[str]:
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
    of it is written, workers and master stay up; once stdout works again batches are accepted."""
    server = start_server(workers=2, stdout_fifo=True, env={"ANALYTICS_LOG_WRITE_TIMEOUT": "0.5"})
    body, before_ids = batch_of("before")
    assert send(server.port, body)[::2] == (200, {"success": True, "received": 3})
    server.wait_for_lines(3)
    workers = server.worker_pids()
    assert len(workers) == 2

    if fault == "broken":
        server.disconnect_stdout()
    else:
        server.pause_stdout()
        fillers = fill_pipe(server.fifo)
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
