"""Summaries of py-spy profiles: where a worker's time goes, by owner (our code, Flask, gunicorn, ...).

    .venv/bin/python bench/profiles.py PROFILE.txt [...]

Reads py-spy's raw (collapsed) output, ``frame;frame;...;frame COUNT`` with the
root first, as ``bench/run.py --profile DIR`` records it (with --native, so that
orjson's Rust and the C below Python show up). A sample whose native frames
show the thread waiting (for work, a lock, the GIL, or the client in poll()) is
counted as waiting, not as CPU. Every other sample is charged to one owner:
orjson if orjson's code is below the innermost Python frame, otherwise the
owner of that frame, which includes the C it calls (interpreter, libc).
"""

import argparse
import collections
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

# "name (path:line)" for Python; "name (library.so)" or "name (file.c:line)" for native code.
_FRAME = re.compile(r"^(?P<name>.*) \((?P<path>[^()]*?)(?::(?P<line>\d+))?\)$")
_OWNERS = {
    "analytics": "service code",
    "app.py": "service code",
    "config.py": "service code",
    "wsgi.py": "service code",
    "bench": "floor code",
    "flask": "flask",
    "werkzeug": "werkzeug",
    "gunicorn": "gunicorn",
    "marshmallow": "marshmallow",
    "structlog": "structlog",
}
ORJSON = "orjson"
_POLLS = {"poll", "__poll", "ppoll", "select", "epoll_wait"}
_CONDITION_WAITS = {"pthread_cond_timedwait", "pthread_cond_wait", "take_gil"}
_SYSCALLS = {
    "send", "recv", "write", "read", "accept4", "accept", "close", "shutdown", "getsockname", "getpeername",
    "fcntl", "fcntl64", "lockf", "lockf64", "ioctl", "setsockopt", "fstat", "futimens", "__futimens", "clock_gettime",
    "sendmsg", "recvmsg", "writev", "getrandom", "epoll_ctl",
}  # fmt: skip


@dataclass(frozen=True)
class Frame:
    """One frame of a stack: its function, file and line; native when it is not Python."""

    name: str
    path: str
    line: int | None

    @property
    def is_python(self) -> bool:
        return self.path.endswith(".py")

    @property
    def owner(self) -> str:
        if not self.is_python:
            return ORJSON if "orjson" in self.path else "native"
        return _OWNERS.get(self.path.split("/", 1)[0], "python stdlib")

    @property
    def function(self) -> str:
        return f"{self.name} ({self.path})"


def parse_frame(text: str) -> Frame:
    """A frame from py-spy's ``name (path:line)`` notation."""
    match = _FRAME.match(text)
    if not match:
        return Frame(text, "?", None)
    line = match.group("line")
    return Frame(match.group("name"), match.group("path"), int(line) if line else None)


def parse_raw(text: str) -> Iterable[tuple[list[Frame], int]]:
    """The stacks (root first) and their sample counts in py-spy's raw output."""
    for row in text.splitlines():
        stack, _, count = row.rstrip().rpartition(" ")
        if stack and count.isdigit():
            yield [parse_frame(frame) for frame in stack.split(";")], int(count)


def wait_kind(native: list[Frame]) -> str | None:
    """What a thread is waiting for, from the native frames below its innermost Python frame; None if running."""
    names = [frame.name for frame in native]
    if any("SimpleQueue_get" in name for name in names):
        return "idle thread"
    if any(name.startswith("PyThread_acquire_lock") for name in names):
        return "lock"
    if any(name in _CONDITION_WAITS for name in names):
        # A thread coming back from C (a socket call, a poll) waits on a condition for the GIL.
        return "GIL"
    if any(name in _POLLS for name in names):
        return "poll (socket or select)"
    return None


@dataclass
class Summary:
    """Sample counts of one profile: waiting by kind; on-CPU by owner and by function."""

    samples: int = 0
    waits: collections.Counter = field(default_factory=collections.Counter)
    owners: collections.Counter = field(default_factory=collections.Counter)
    syscalls: int = 0
    self_functions: collections.Counter = field(default_factory=collections.Counter)
    self_lines: collections.Counter = field(default_factory=collections.Counter)
    inclusive_owners: collections.Counter = field(default_factory=collections.Counter)
    inclusive_functions: collections.Counter = field(default_factory=collections.Counter)

    @property
    def on_cpu(self) -> int:
        return self.samples - sum(self.waits.values())


def summarize(stacks: Iterable[tuple[list[Frame], int]]) -> Summary:
    """Count waiting samples by kind, and on-CPU samples by owner and by everything on their stack."""
    summary = Summary()
    for stack, count in stacks:
        summary.samples += count
        python = [index for index, frame in enumerate(stack) if frame.is_python]
        inner = stack[python[-1]] if python else None
        native = stack[python[-1] + 1 :] if python else stack
        kind = wait_kind(native)
        if kind:
            summary.waits[kind] += count
            continue
        in_orjson = any(frame.owner == ORJSON for frame in native)
        owner = ORJSON if in_orjson else inner.owner if inner else "native"
        summary.owners[owner] += count
        if native and native[-1].name in _SYSCALLS:
            summary.syscalls += count
        where = inner.function if inner else "?"
        summary.self_functions[f"orjson, called by {where}" if in_orjson else where] += count
        if inner and inner.owner == "service code":
            summary.self_lines[f"{inner.path}:{inner.line} {inner.name}"] += count
        # What runs before gunicorn's first frame is the entry point (a script's main), not the request.
        start = next((index for index, frame in enumerate(stack) if frame.owner == "gunicorn"), 0)
        frames = [frame for frame in stack[start:] if frame.is_python]
        for name in {frame.owner for frame in frames} | ({ORJSON} if in_orjson else set()):
            summary.inclusive_owners[name] += count
        for function in {Frame(frame.name, frame.path, None) for frame in frames}:
            summary.inclusive_functions[function] += count
    return summary


def _percent(count: int, total: int) -> str:
    return f"{100 * count / total:.1f}%" if total else "-"


def _listing(title: str, counts: Iterable[tuple[str, int]], total: int, top: int) -> list[str]:
    """A titled list of the first ``top`` entries as percentages of ``total``."""
    rows = [f"  - {_percent(count, total)} {name}" for name, count in list(counts)[:top]]
    return [title, *rows] if rows else []


def report(name: str, summary: Summary, top: int = 12) -> str:
    """A text report of one profile: percentages are of the on-CPU samples unless said otherwise."""
    total, cpu = summary.samples, summary.on_cpu
    waits = ", ".join(f"{kind} {_percent(count, total)}" for kind, count in summary.waits.most_common()) or "none"
    lines = [
        f"## {name}: {total} samples, {cpu} on CPU",
        f"- waiting, of all samples: {waits}",
        "- on CPU, by owner (self time): "
        + ", ".join(f"{owner} {_percent(count, cpu)}" for owner, count in summary.owners.most_common()),
        f"- on CPU in a syscall (send, recv, write, accept, lockf, ...): {_percent(summary.syscalls, cpu)}",
        "- inclusive (that owner anywhere on the stack): "
        + ", ".join(
            f"{owner} {_percent(count, cpu)}"
            for owner, count in summary.inclusive_owners.most_common()
            if owner not in ("gunicorn", "python stdlib")
        ),
    ]
    lines += _listing("- top functions, self time:", summary.self_functions.most_common(), cpu, top)
    functions = summary.inclusive_functions.most_common()
    # The stages of a request: what sits under the worker's loop, without the loop itself.
    stages = [(f.function, n) for f, n in functions if n < 0.9 * cpu and f.owner in ("gunicorn", "flask")]
    lines += _listing("- gunicorn and Flask functions, inclusive:", stages, cpu, top)
    ours = [(f.function, n) for f, n in functions if f.owner in ("service code", "marshmallow", "structlog")]
    lines += _listing("- service, marshmallow and structlog functions, inclusive:", ours, cpu, top)
    hot = summary.self_lines.most_common()
    lines += _listing("- hottest lines of the service code, self time (with the C they call):", hot, cpu, top)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print a report of every profile given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profiles", type=Path, nargs="+", help="py-spy raw output files")
    parser.add_argument("--top", type=int, default=12, help="functions and lines listed (default 12)")
    args = parser.parse_args(argv)
    for path in args.profiles:
        print(report(path.stem, summarize(parse_raw(path.read_text())), args.top))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
