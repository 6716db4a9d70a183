"""Pieces of the event log that the end-to-end tests reach only at their edges."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from analytics.stdout import LockedWriter, StdoutNotWritableError, _line_chunks, check_writable

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("size", [1, 5, 9, 10, 11, 64, 1000])
def test_line_chunks_are_whole_lines_within_the_size(size):
    """A batch larger than the pipe is cut only between lines, each piece within the size unless one line is longer."""
    data = b"".join(b"x" * length + b"\n" for length in (3, 9, 0, 20, 4, 4, 1))
    chunks = [bytes(chunk) for chunk in _line_chunks(data, size)]
    assert b"".join(chunks) == data
    for chunk in chunks:
        assert chunk.endswith(b"\n")
        assert len(chunk) <= size or chunk.count(b"\n") == 1


# A file-size limit (RLIMIT_FSIZE) makes the kernel take part of a write and refuse the rest, as a full
# disk does, without root. In a child process, since the limit would bind every file the tests write.
FILE_LIMIT_SCRIPT = """
import os, resource, sys
from analytics.stdout import LockedWriter, LogWriteError

path, flags, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
writer = LockedWriter(os.open(path, flags), timeout=5)

def batch(tag, count):
    return b"".join(b'{"id":"%s-%d","pad":"%s"}\\n' % (tag.encode(), n, b"p" * 1000) for n in range(count))

writer.write(batch("before", 2))
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
try:
    writer.write(batch("failed", 8))
except LogWriteError as error:
    print(error)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
writer.write(batch("after", 2))
"""


@pytest.mark.parametrize("append", [False, True], ids=["offset", "O_APPEND"])
def test_file_write_cut_short_is_taken_back(tmp_path, append):
    """A file that takes only part of a batch (here a file-size limit, on a full disk ENOSPC): the batch fails
    and the file is cut back to where it started, so the next batch starts on a line of its own."""
    path = tmp_path / "events.log"
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    done = subprocess.run(
        [sys.executable, "-c", FILE_LIMIT_SCRIPT, str(path), str(flags), "5000"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "[Errno 27] File too large\n", "")
    ids = [json.loads(line)["id"] for line in path.read_bytes().split(b"\n")[:-1]]
    assert path.read_bytes().endswith(b"\n")
    assert ids == ["before-0", "before-1", "after-0", "after-1"]


def test_check_writable_accepts_what_can_be_written(tmp_path):
    """A pipe with a reader, a socket with a peer, a regular file, /dev/null: all pass."""
    read_end, write_end = os.pipe()
    left, right = socket.socketpair()
    with left, right, (tmp_path / "log").open("wb") as file, open(os.devnull, "wb") as null:
        for fd in (write_end, left.fileno(), file.fileno(), null.fileno()):
            check_writable(fd)
    os.close(read_end)
    os.close(write_end)


def refusal(fd: int) -> str:
    """The message check_writable refuses ``fd`` with."""
    with pytest.raises(StdoutNotWritableError) as refused:
        check_writable(fd)
    return str(refused.value)


def test_check_writable_refuses_with_one_line_saying_why(tmp_path):
    """Closed, read-only, a listening socket (what fd 1 becomes when closed at exec), a pipe or socket whose
    other end is gone: each refused, the message naming the descriptor and the reason."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    left, right = socket.socketpair()
    right.close()
    listener = socket.create_server(("127.0.0.1", 0))
    with left, listener, (tmp_path / "log").open("wb") as file, open(file.name, "rb") as read_only:
        # A number free now: checked first, before anything can take it.
        closed = os.dup(write_end)
        os.close(closed)
        assert [refusal(fd) for fd in (closed, read_only.fileno(), listener.fileno(), write_end, left.fileno())] == [
            f"stdout (fd {closed}) is not writable: it is closed",
            f"stdout (fd {read_only.fileno()}) is not writable: it is open for reading only",
            f"stdout (fd {listener.fileno()}) is not writable: it is a listening socket (was stdout closed at start?)",
            f"stdout (fd {write_end}) is not writable: nothing reads it (the other end is closed)",
            f"stdout (fd {left.fileno()}) is not writable: nothing reads it (the other end is closed)",
        ]
    os.close(write_end)


def test_socket_unready_while_full_and_a_cut_line_is_ended():
    """stdout a socket (journald's stream): /readyz's reason while its reader stalls; and a write that a
    signal's exception (gunicorn's timeout) cuts mid-line leaves that line ended with a newline."""
    left, right = socket.socketpair()
    with left, right:
        left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        writer = LockedWriter(left.fileno(), timeout=5)
        assert writer.unready_reason(min_free=1) is None
        line = b'{"pad":"' + b"p" * 990 + b'"}\n'
        batch = line * 2000
        received = bytearray()

        def timeout(signum: int, frame: Any) -> None:
            # Once the batch has started, read a little, so that the newline has room, then end the
            # write as gunicorn's timeout does (SystemExit from its SIGABRT handler).
            try:
                received.extend(right.recv(65536, socket.MSG_DONTWAIT))
            except BlockingIOError:
                signal.setitimer(signal.ITIMER_REAL, 0.05)
                return
            raise SystemExit(1)

        previous = signal.signal(signal.SIGALRM, timeout)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            with pytest.raises(SystemExit):
                writer.write(batch)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        assert writer.unready_reason(min_free=1) is None
        right.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while chunk := right.recv(1 << 20):
                received.extend(chunk)
        assert len(received) < len(batch)
        lines = bytes(received).split(b"\n")
        assert lines[-1] == b""
        assert set(lines[:-2]) == {line[:-1]}
        assert line.startswith(lines[-2]) and len(lines[-2]) < len(line) - 1

        # The reader stalls: the socket fills.
        left.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                left.send(line)
        assert writer.unready_reason(min_free=1) == "stdout takes no writes (its reader has stalled)"
