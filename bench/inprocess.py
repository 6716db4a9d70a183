"""The service's and the floor's Flask apps called in one process: CPU time per request, without gunicorn or wrk.

    .venv/bin/python bench/inprocess.py [--batches 1,10,100] [--rounds 11] [--code DIR]

Each app is handed the WSGI environ gunicorn would build for a request of the
bench's body (bench/payloads.py) and its answer is checked (200 and the count);
the event lines go to /dev/null. Rounds alternate between the two apps, so a
shared machine's drift falls on both alike, and the table has the least CPU
time of the rounds per request: the app's own cost, which other load can only
add to. What this leaves out, gunicorn's HTTP parsing, the socket and the pipe's
reader, both pay alike; bench/run.py measures it all.

The service is built with the settings of the environment (``ANALYTICS_*``),
so a setting's cost is the difference between two runs. ``--code DIR`` runs
the service from another tree (``git archive COMMIT | tar -x -C DIR``).
"""

import argparse
import io
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import orjson  # noqa: E402

WsgiApp = Callable[[dict, Callable], Any]


def environ(body: bytes) -> dict[str, Any]:
    """What gunicorn hands the app for a POST of ``body`` from a client on loopback."""
    return {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/api/analytics",
        "SCRIPT_NAME": "",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "40000",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(body)),
        "HTTP_HOST": "127.0.0.1:8000",
        "HTTP_USER_AGENT": "wrk",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.input_terminated": True,
        "wsgi.errors": sys.stderr,
        "wsgi.version": (1, 0),
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }


def answer(app: WsgiApp, body: bytes, events: int) -> None:
    """Post ``body`` to ``app``; raise unless it answers 200 with ``events`` received."""
    statuses = []
    result = app(environ(body), lambda status, headers, exc_info=None: statuses.append(status))
    try:
        data = b"".join(result)
    finally:
        getattr(result, "close", lambda: None)()
    if not statuses[0].startswith("200") or orjson.loads(data)["received"] != events:
        raise RuntimeError(f"wrong answer: {statuses[0]} {data[:200]!r}")


def cpu_per_request(app: WsgiApp, body: bytes, events: int, requests: int) -> float:
    """Microseconds of this process's CPU time per request, over ``requests`` requests."""
    start = time.process_time()
    for _ in range(requests):
        answer(app, body, events)
    return (time.process_time() - start) / requests * 1e6


def apps(code: Path | None) -> tuple[WsgiApp, WsgiApp]:
    """The floor's app and the service's (both write their lines to stdout)."""
    if code is not None:
        sys.path.insert(0, str(code.resolve()))
    import app as service_module
    from bench import floor

    return floor.app, service_module.create_app()


def main() -> None:
    """Print each batch size's CPU per request, floor and service, and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,10,100", help="events per request, comma-separated")
    parser.add_argument("--rounds", type=int, default=11, help="rounds per app and batch size (default 11)")
    parser.add_argument("--code", type=Path, help="run the service from this tree")
    args = parser.parse_args()
    # Both apps write their event lines to descriptor 1: /dev/null for the run, the table to the real stdout.
    table = os.fdopen(os.dup(1), "w")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    floor, service = apps(args.code)
    from bench.payloads import make_body

    # Per event: the slope from the first batch size, request costs taken out.
    print("batch | floor µs/request | service µs/request | floor over service | µs/event, floor / service", file=table)
    first: tuple[int, float, float] | None = None
    for batch in (int(size) for size in args.batches.split(",")):
        body = make_body(batch)
        requests = max(50, 20000 // (batch + 20))
        for app in (floor, service):
            cpu_per_request(app, body, batch, requests // 5)  # warm-up
        floor_times, service_times = [], []
        for _ in range(args.rounds):
            floor_times.append(cpu_per_request(floor, body, batch, requests))
            service_times.append(cpu_per_request(service, body, batch, requests))
        floor_us, service_us = min(floor_times), min(service_times)
        first = first or (batch, floor_us, service_us)
        slopes = ""
        if batch > first[0]:
            slopes = (
                f"{(floor_us - first[1]) / (batch - first[0]):.2f} / {(service_us - first[2]) / (batch - first[0]):.2f}"
            )
        print(
            f"{batch} | {floor_us:.1f} | {service_us:.1f} | {floor_us / service_us:.2f} | {slopes}",
            file=table,
            flush=True,
        )


if __name__ == "__main__":
    main()
