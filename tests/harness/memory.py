"""A process's memory, read from /proc, and what a worker may hold between requests."""

from pathlib import Path

# What a worker may hold between requests. Started with the defaults, it holds about 45 MiB.
MAX_HELD_KIB = 64 * 1024


def memory_kib(pid: int) -> dict[str, int]:
    """The process's resident memory now (VmRSS) and at its peak (VmHWM), in KiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {name: int(fields[name].split()[0]) for name in ("VmRSS", "VmHWM")}
