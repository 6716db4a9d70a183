"""The command line of bench/run.py, read into one immutable Options."""

import argparse
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from bench import ROOT
from bench.servers import BIN, ServerSpec

# The first paragraph of bench/run.py's docstring, for --help.
DESCRIPTION = "The benchmark: the service against the floor, side by side, with one command."


@dataclass(frozen=True)
class Options:
    """What to measure and how, from the command line; None for a CPU means not pinned."""

    duration: int
    warmup: int
    batches: tuple[int, ...]
    repeats: int
    connections: int
    wrk_threads: int
    services: tuple[ServerSpec, ...]
    # Request headers wrk sends besides the body's (name, value).
    headers: tuple[tuple[str, str], ...]
    connection_close: bool
    settle: float
    rss_requests: int
    # The folder for py-spy's profiles and py-spy itself, with --profile; None without it.
    profile: Path | None
    py_spy: str | None
    profile_rate: int
    profile_python_only: bool
    server_cpu: int | None
    load_cpu: int | None
    code: Path
    results: Path


def parse_service(text: str) -> ServerSpec:
    """``sync`` or ``gthread:THREADS`` (``gthread`` alone is 4 threads) as a service spec."""
    worker_class, _, threads = text.partition(":")
    if worker_class == "sync" and not threads:
        return ServerSpec("service")
    if worker_class == "gthread":
        count = int(threads or 4)
        if count < 1:
            raise argparse.ArgumentTypeError("gthread needs at least one thread")
        return ServerSpec("service", "gthread", count)
    raise argparse.ArgumentTypeError(f"expected sync or gthread:N, not {text!r}")


def parse_variant(text: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """``NAME:SETTING=VALUE;SETTING=VALUE`` as a variant's name and its settings (without the ANALYTICS_ prefix)."""
    name, _, pairs = text.partition(":")
    settings = tuple(tuple(pair.split("=", 1)) for pair in pairs.split(";") if pair)
    if not re.fullmatch(r"[a-z0-9-]+", name) or not settings or any(len(pair) != 2 or not pair[0] for pair in settings):
        raise argparse.ArgumentTypeError(f"expected NAME:SETTING=VALUE[;SETTING=VALUE...], not {text!r}")
    return name, settings  # type: ignore[return-value]


def parse_header(text: str) -> tuple[str, str]:
    """``Name: value`` as a header."""
    name, colon, value = text.partition(":")
    if not colon or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', not {text!r}")
    return name.strip(), value.strip()


def parse_args(argv: Sequence[str] | None) -> Options:
    """The command line; the defaults are the yardstick the goals are set for."""
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--duration", type=int, default=15, help="seconds measured per run (default 15)")
    parser.add_argument("--warmup", type=int, default=5, help="seconds of load before each run (default 5; 0: none)")
    parser.add_argument("--batches", default="1,10,100", help="events per request, comma-separated (default 1,10,100)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of everything; the table has medians (default 1)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument(
        "--service",
        type=parse_service,
        action="append",
        help="worker class of a service to measure: sync or gthread:THREADS; repeat to compare (default sync)",
    )
    parser.add_argument(
        "--sink",
        choices=("stdout", "nats", "kafka"),
        action="append",
        help="where each service writes (ANALYTICS_SINKS): stdout, nats (a local nats-server, started for the run) or "
        "kafka (a local Tansu broker, likewise); repeat to measure them side by side (default stdout)",
    )
    parser.add_argument(
        "--variant",
        type=parse_variant,
        action="append",
        help="also run each service with these ANALYTICS_* settings, e.g. metrics-off:METRICS=false (';' between "
        "settings), compared with itself without them; repeat for several",
    )
    parser.add_argument(
        "--header", type=parse_header, action="append", help="a request header wrk sends, e.g. 'User-Agent: ...'"
    )
    parser.add_argument(
        "--connection-close",
        action="store_true",
        help="send Connection: close, so keep-alive workers reconnect every request too (a proxy without pooling)",
    )
    parser.add_argument(
        "--settle", type=float, default=0.5, help="seconds without a new event line that mean the server is done"
    )
    parser.add_argument("--rss-requests", type=int, default=20, help="1 MiB requests in the RSS burst (0: skip)")
    parser.add_argument("--profile", type=Path, help="record each measured run with py-spy into this folder")
    parser.add_argument("--profile-rate", type=int, default=250, help="py-spy samples per second (default 250)")
    parser.add_argument(
        "--profile-python-only", action="store_true", help="py-spy without --native (orjson then counts as its caller)"
    )
    parser.add_argument("--server-cpu", type=int, default=0, help="CPU of the servers (default 0)")
    parser.add_argument("--load-cpu", type=int, default=1, help="CPU of wrk and this harness (default 1)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin anything to a CPU")
    parser.add_argument(
        "--code",
        type=Path,
        default=ROOT,
        help="run the service from this tree, e.g. an older commit: git archive COMMIT | tar -x -C DIR",
    )
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results", help="where raw results go")
    args = parser.parse_args(argv)
    batches = tuple(int(b) for b in args.batches.split(","))
    pinned = not args.no_pin and (os.cpu_count() or 1) >= 2
    py_spy = None
    if args.profile:
        py_spy = shutil.which("py-spy", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        if not py_spy:
            parser.error("--profile needs py-spy: .venv/bin/pip install py-spy")
    if not shutil.which("wrk"):
        parser.error("wrk is not installed: apt-get install wrk")
    return Options(
        duration=args.duration,
        warmup=args.warmup,
        batches=batches,
        repeats=args.repeats,
        connections=args.connections,
        wrk_threads=args.wrk_threads,
        services=tuple(
            replace(spec, sink=sink, variant=variant, settings=settings)
            for spec in args.service or [ServerSpec("service")]
            for sink in dict.fromkeys(args.sink or ["stdout"])
            for variant, settings in [("", ()), *(args.variant or [])]
        ),
        headers=tuple(args.header or ()),
        connection_close=args.connection_close,
        settle=args.settle,
        rss_requests=args.rss_requests,
        profile=args.profile,
        py_spy=py_spy,
        profile_rate=args.profile_rate,
        profile_python_only=args.profile_python_only,
        server_cpu=args.server_cpu if pinned else None,
        load_cpu=args.load_cpu if pinned else None,
        code=args.code.resolve(),
        results=args.results,
    )
