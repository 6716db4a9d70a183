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
whole lines: a write that fits is never cut short, and a failed batch leaves
no partial line behind.

A file or socket can take part of a batch and then fail (a full disk, a
reader gone), which would glue the next batch's first line to the fragment.
So after a failed write the log is put back on a line boundary before the lock
is released: a regular file is truncated back to where the batch started (its
size under O_APPEND, else the shared offset, both read under the lock) and the
offset set there, so the batch leaves nothing; anything that cannot be
truncated (a socket, a terminal) gets the fragment ended with a newline if it
still takes one byte, so the next batch starts on a line of its own.

``check_writable`` refuses a stdout the service could never write to, at
start; ``LockedWriter.unready_reason`` says when it cannot take a batch now.
"""

import fcntl
import os
import select
import socket
import stat
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial

# Linux lets any process grow a pipe to this much (fs.pipe-max-size's default).
PIPE_SIZE = 1024 * 1024
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# The pipe's space is counted in pages; unread bytes can straddle two more than they fill.
PIPE_MARGIN = 2 * PAGE_SIZE
NEWLINE = ord("\n")


class LogWriteError(Exception):
    """The event log could not take the batch: nothing of it, or only whole lines, was written.

    Whole lines are left by a batch larger than the pipe that fails between pieces, and by a
    socket or terminal that fails part way: there the line it cut is ended with a newline.
    """


class StdoutNotWritableError(RuntimeError):
    """stdout is something the event log can never write to: the service must not start.

    A RuntimeError, which gunicorn reports from a master hook as one line, "Error: <message>", and exits 1.
    """

    def __init__(self, fd: int, reason: str) -> None:
        super().__init__(f"stdout (fd {fd}) is not writable: {reason}")
        self.reason = reason


def _is_listening(fd: int) -> bool:
    """Whether the socket ``fd`` is a listening socket."""
    # A duplicate, since closing the socket object closes its descriptor.
    with socket.socket(fileno=os.dup(fd)) as sock:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


def check_writable(fd: int) -> None:
    """Raise StdoutNotWritableError unless ``fd`` is open for writing and, for a pipe or socket, has a reader.

    A full pipe or disk passes: it may drain, and ``LockedWriter.unready_reason`` reports it meanwhile.
    """
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        mode = os.fstat(fd).st_mode
    except OSError:
        raise StdoutNotWritableError(fd, "it is closed") from None
    if flags & os.O_ACCMODE == os.O_RDONLY:
        raise StdoutNotWritableError(fd, "it is open for reading only")
    # A stdout closed at exec (`>&-`) hands its number to the next descriptor opened: gunicorn's listener.
    if stat.S_ISSOCK(mode) and _is_listening(fd):
        raise StdoutNotWritableError(fd, "it is a listening socket (was stdout closed at start?)")
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    for _, revents in poller.poll(0):
        if revents & (select.POLLERR | select.POLLHUP):
            raise StdoutNotWritableError(fd, "nothing reads it (the other end is closed)")


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


def _free_space(fd: int) -> int | None:
    """Bytes an unprivileged writer may still add to the filesystem of ``fd``; None if it does not say."""
    fs = os.fstatvfs(fd)
    return fs.f_bavail * fs.f_frsize if fs.f_blocks else None


class LockedWriter:
    """Writes whole buffers to a file descriptor, never interleaved with another writer's."""

    def __init__(self, fd: int, timeout: float) -> None:
        self.fd = fd
        self.timeout = timeout
        self._thread_lock = threading.Lock()
        # What stdout is, read once: a pipe gets the room-first writes described above,
        # a file or socket the repair after a failed write.
        self._pipe_size = _grow_pipe(fd)
        mode = os.fstat(fd).st_mode
        self._is_file = stat.S_ISREG(mode)
        self._is_socket = stat.S_ISSOCK(mode)
        self._append = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND)

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

    def _file_end(self) -> int:
        """Where the next write lands in the regular file: its end under O_APPEND, else the shared offset."""
        return os.fstat(self.fd).st_size if self._append else os.lseek(self.fd, 0, os.SEEK_CUR)

    def _end_line(self) -> None:
        """Write one newline, without waiting: a socket or terminal that failed mid-batch may take no more."""
        if self._is_socket:
            with socket.socket(fileno=os.dup(self.fd)) as sock:
                sock.send(b"\n", socket.MSG_DONTWAIT)
        else:
            os.write(self.fd, b"\n")

    def _realign(self, start: int, cut: bool) -> str | None:
        """After a failed write, put the log back on a line boundary; what is left torn, if that failed.

        A regular file is truncated back to ``start``, judged by the kernel's offset, not by a count
        of what was written. Anything else gets a newline if the batch left a line ``cut``.
        """
        try:
            if self._is_file:
                try:
                    if self._file_end() != start:
                        os.ftruncate(self.fd, start)
                        os.lseek(self.fd, start, os.SEEK_SET)
                    return None
                except OSError:
                    pass  # an append-only file, say: end the fragment instead
            if cut:
                self._end_line()
        except OSError as error:
            return f"its last line is left unterminated ({error})"
        return None

    def _write_file_or_socket(self, data: bytes, deadline: float) -> None:
        """Write to a file or socket: once the first byte is out the rest follows, gunicorn's worker
        timeout being the backstop; a failure part way is repaired by ``_realign``."""
        self._wait_writable(deadline)
        start = self._file_end() if self._is_file else 0
        view = memoryview(data)
        written = 0
        try:
            while written < len(data):
                written += os.write(self.fd, view[written:])
        except OSError as error:
            # The write that failed took nothing, so ``written`` is exact.
            torn = self._realign(start, cut=written > 0 and data[written - 1] != NEWLINE)
            if torn:
                raise LogWriteError(f"{error}; {torn}") from error
            raise
        except BaseException:
            # A signal's exception (gunicorn's timeout raises SystemExit) can land between a write and
            # its tally: what went out is unknown, so the line is ended anyway, at worst as a blank line.
            self._realign(start, cut=True)
            raise

    def _write_locked(self, data: bytes, deadline: float) -> None:
        if self._pipe_size is None:
            self._write_file_or_socket(data, deadline)
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

    def unready_reason(self, min_free: int) -> str | None:
        """Why the event log cannot take a batch right now, or None when it can.

        Not ready: stdout unwritable (see ``check_writable``); a pipe without room for a page of
        lines (its reader has stalled); a socket or terminal that takes no byte now; a regular
        file whose filesystem has fewer than ``min_free`` bytes free.
        """
        try:
            check_writable(self.fd)
            if self._pipe_size is not None:
                return None if self._has_room(PAGE_SIZE) else "the stdout pipe is full (its reader has stalled)"
            if self._is_file:
                free = _free_space(self.fd)
                if free is not None and free < min_free:
                    return f"{free} bytes free on the filesystem of stdout, fewer than {min_free}"
                return None
            poller = select.poll()
            poller.register(self.fd, select.POLLOUT)
            return None if poller.poll(0) else "stdout takes no writes (its reader has stalled)"
        except StdoutNotWritableError as error:
            return f"stdout is not writable: {error.reason}"
        except OSError as error:
            return f"stdout cannot be checked: {error}"
