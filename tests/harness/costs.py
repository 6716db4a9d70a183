"""What a body costs the service in CPU, as a ratio to a valid batch's measured in the same run: never against a
fixed time, since the machine is shared."""

import statistics
import time

import orjson
import pytest
from flask.testing import FlaskClient

from app import create_app
from config import Config
from tests.harness.events import realistic_event

# "A few times" a valid batch of a thousand events, as the worst any body may cost. The worst bodies found cost
# 4 to 5 valid batches, and a busy machine adds to that: checked at once (analytics.fastload), a valid batch
# costs less than the event-by-event path that invalid events and odd payloads take.
WORST_OVER_VALID = 8


def cpu_seconds(client: FlaskClient, body: bytes) -> float:
    """The CPU time this process spends answering ``body`` (the service runs in it: Flask's test client)."""
    start = time.process_time()
    client.post("/api/analytics", data=body)
    return time.process_time() - start


def cpu_over_valid(
    capfd: pytest.CaptureFixture[str], bodies: dict[str, tuple[FlaskClient, bytes]], rounds: int = 5
) -> dict[str, float]:
    """Each body's CPU time, answered by its client, over a valid batch's (a thousand realistic page views, default
    settings), to a tenth; also printed (shown by pytest -rP).

    Medians of ``rounds`` interleaved rounds, in CPU time rather than wall time, so that other load matters less.
    """
    plain = create_app({"TESTING": True}).test_client()
    valid = orjson.dumps({"events": [realistic_event(number) for number in range(Config.MAX_EVENTS)]})
    assert plain.post("/api/analytics", data=valid).json == {"success": True, "received": Config.MAX_EVENTS}
    valid_costs: list[float] = []
    costs: dict[str, list[float]] = {name: [] for name in bodies}
    for _ in range(rounds):
        valid_costs.append(cpu_seconds(plain, valid))
        for name, (client, body) in bodies.items():
            costs[name].append(cpu_seconds(client, body))
        # The lines written, dropped as they come rather than held by pytest to the end of the test.
        capfd.readouterr()
    valid_cost = statistics.median(valid_costs)
    ratios = {name: round(statistics.median(times) / valid_cost, 1) for name, times in costs.items()}
    print("CPU per body over a valid batch's:", ratios)
    return ratios
