"""What enrichment costs: events per CPU-second with every enrichment on, over the same build with all of it off.

Measured in this process, through the WSGI app (everything a request costs but
gunicorn's HTTP parsing and the socket, which enrichment does not change and
which would make its share look smaller), as CPU time of this process, in
interleaved rounds, as medians: other load on the machine matters little.
"""

import statistics
import time
from typing import Any

import pytest
from flask import Flask
from werkzeug.test import EnvironBuilder

from app import create_app
from bench.payloads import make_body

# The goal: with every enrichment on, at least this share of the events per second of enrichment off.
GOAL = 0.85
CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"
)
ALL_ON = {
    "CLIENT_IP": "anonymized",
    "VISITOR_ID_SECRET": "cost-test-secret-0123456789abcdefghijklmn",
    "PARSE_USER_AGENT": True,
    "BOTS": "keep",
    "EXCLUDE_IPS": ["198.51.100.0/24", "2001:db8:ffff::/48"],
    "DERIVED_TIMESTAMP": True,
}
ALL_OFF = {"CLIENT_IP": "full", "DERIVED_TIMESTAMP": False, "BOTS": "off"}
# Rounds of a few requests each (about 20 ms of CPU): many short ones, so that a burst of other load spoils few.
ROUNDS = 60


def environs(body: bytes, count: int) -> list[dict[str, Any]]:
    """``count`` requests of a browser behind the trusted proxy, each ready for the WSGI app."""
    headers = {
        "User-Agent": CHROME,
        "X-Forwarded-For": "203.0.113.9",
        "Origin": "https://shop.example",
        "Content-Type": "text/plain",
    }
    return [
        EnvironBuilder(
            path="/api/analytics", method="POST", data=body, headers=headers, environ_base={"REMOTE_ADDR": "127.0.0.1"}
        ).get_environ()
        for _ in range(count)
    ]


def cpu_per_request(app: Flask, body: bytes, count: int) -> float:
    """CPU seconds of this process per request, over ``count`` requests answered by ``app``."""
    requests = environs(body, count)
    statuses = []

    def start_response(status: str, headers: list, exc_info: Any = None) -> None:
        statuses.append(status)

    start = time.process_time()
    for environ in requests:
        b"".join(app.wsgi_app(environ, start_response))
    spent = time.process_time() - start
    assert statuses == ["200 OK"] * count
    return spent / count


@pytest.mark.parametrize("batch", [1, 10, 100])
def test_enrichment_keeps_most_of_the_throughput(capfd, batch):
    """Every enrichment on keeps at least GOAL of the events per CPU-second of the same build with it off.

    Each round measures both, one right after the other (in turns, which first), and the
    median of the rounds' ratios is taken: a machine busy with other work slows a round's
    two measurements alike.
    """
    apps = {"off": create_app({"TESTING": True, **ALL_OFF}), "on": create_app({"TESTING": True, **ALL_ON})}
    body = make_body(batch)
    count = max(3, 60 // batch)
    for app in apps.values():
        cpu_per_request(app, body, count)  # warm: caches, the parser's first use
    ratios, costs = [], {"off": [], "on": []}
    for round_number in range(ROUNDS):
        for name in ("off", "on") if round_number % 2 == 0 else ("on", "off"):
            costs[name].append(cpu_per_request(apps[name], body, count))
        ratios.append(costs["off"][-1] / costs["on"][-1])
        capfd.readouterr()
    ratio = statistics.median(ratios)
    on, off = statistics.median(costs["on"]), statistics.median(costs["off"])
    print(f"batch {batch}: {on * 1e6:.0f} µs on, {off * 1e6:.0f} µs off per request: {ratio:.2f} of the events/s")
    assert ratio >= GOAL
