"""The locked writer under the event log: whole buffers to stdout, never interleaved or torn.

Several gunicorn workers (and threads) share one stdout, and a pipe makes only
writes of up to 4096 bytes atomic, while one event line can be tens of KiB.
So a batch is rendered into one buffer and written while holding a POSIX
record lock on stdout itself: every process writing to the same pipe, file or
socket waits its turn, and the kernel drops the lock if the holder dies. The
lock belongs to a process, so a thread lock covers the threads within one.

A lock is not enough on a pipe: a writer killed (by the OOM killer, or by
gunicorn's timeout) while its write waits for room leaves half a line that the
next writer's line is glued to. So on a pipe nothing is written until there is
room for all of it, or, for a batch larger than the pipe, for each piece of
whole lines: a write that fits is never cut short.
"""

import fcntl
import os
import select
import stat
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial

# Linux lets any process grow a pipe to this much (fs.pipe-max-size's default).
PIPE_SIZE = 1024 * 1024
# The pipe's space is counted in pages; unread bytes can straddle two more than they fill.
PIPE_MARGIN = 2 * os.sysconf("SC_PAGE_SIZE")


class LogWriteError(Exception):
    """The event log could not take the batch: nothing of it, or (past a pipe's size) only whole lines, was written."""


def _grow_pipe(fd: int) -> int | None:
    """The capacity of the pipe ``fd`` after asking for PIPE_SIZE; None when ``fd`` is no pipe."""
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # over fs.pipe-max-size: the pipe keeps the size it had
    return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)


def _unread(fd: int) -> int:
    """Bytes in the pipe that its reader has not read yet."""
    return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, bytes(4)), sys.byteorder)


def _line_chunks(data: bytes, size: int) -> Iterator[memoryview]:
    """``data`` in pieces of whole lines of at most ``size`` bytes, but for a single line longer than that."""
    view = memoryview(data)
    start = 0
    while len(data) - start > size:
        cut = data.rfind(b"\n", start, start + size) + 1
        if cut <= start:
            cut = data.index(b"\n", start) + 1
        yield view[start:cut]
        start = cut
    if start < len(data):
        yield view[start:]


def _poll_until(condition: Callable[[], bool], deadline: float, failure: str) -> None:
    """Return once ``condition()`` holds, checking at growing intervals; LogWriteError(failure) at the deadline."""
    pause = 0.0001
    while not condition():
        if time.monotonic() + pause > deadline:
            raise LogWriteError(failure)
        time.sleep(pause)
        pause = min(pause * 2, 0.01)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


class LockedWriter:
    """Writes whole buffers to a file descriptor, never interleaved with another writer's."""

    def __init__(self, fd: int, timeout: float) -> None:
        self.fd = fd
        self.timeout = timeout
        self._thread_lock = threading.Lock()
        # What stdout is, read once: a pipe gets the room-first writes described above.
        self._pipe_size = _grow_pipe(fd)

    def _try_lock(self) -> bool:
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            return False
        return True

    def _wait_writable(self, deadline: float) -> None:
        """Wait until the descriptor takes bytes, so a blocked reader fails the batch before it starts."""
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        events = poller.poll(max(0.0, deadline - time.monotonic()) * 1000)
        if not events:
            raise LogWriteError("timed out waiting for stdout to accept writes")
        if events[0][1] & (select.POLLERR | select.POLLHUP):
            raise LogWriteError("stdout is closed")

    def _has_room(self, size: int) -> bool:
        """Whether the pipe can take ``size`` bytes at once (or is empty, for a longer line)."""
        assert self._pipe_size is not None
        needed = min(size, self._pipe_size - PIPE_MARGIN) + PIPE_MARGIN
        return self._pipe_size - _unread(self.fd) >= needed

    def _write_locked(self, data: bytes, deadline: float) -> None:
        if self._pipe_size is None:
            # A file or socket: once the first byte is out the rest follows, gunicorn's
            # worker timeout being the backstop.
            self._wait_writable(deadline)
            _write_all(self.fd, memoryview(data))
            return
        for chunk in _line_chunks(data, self._pipe_size - PIPE_MARGIN):
            has_room = partial(self._has_room, len(chunk))
            _poll_until(has_room, deadline, "timed out waiting for room in the stdout pipe")
            _write_all(self.fd, chunk)

    def write(self, data: bytes) -> None:
        """Write all of ``data`` or raise LogWriteError; never leave a line torn."""
        deadline = time.monotonic() + self.timeout
        if not self._thread_lock.acquire(timeout=self.timeout):
            raise LogWriteError("timed out waiting for the log lock")
        try:
            # Polled, not blocking, so that a holder stuck on a full stdout cannot hang us past the deadline.
            _poll_until(self._try_lock, deadline, "timed out waiting for the log lock")
            try:
                self._write_locked(data, deadline)
            finally:
                fcntl.lockf(self.fd, fcntl.LOCK_UN)
        except OSError as error:
            raise LogWriteError(str(error)) from error
        finally:
            self._thread_lock.release()
