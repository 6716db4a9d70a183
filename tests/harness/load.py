"""Load with exact accounting: batches with known ids and known answers, sent concurrently, each outcome kept."""

import http.client
import itertools
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import orjson

from config import Config
from tests.harness.clients import send

# The servers under load run with the default limit: batches hold events exactly at it and one byte past.
MAX_EVENT_BYTES = Config.MAX_EVENT_BYTES


@dataclass
class Batch:
    """A request body and what the service must make of it."""

    body: bytes
    # Events the service must accept, by id, as sent.
    accepted: dict[str, dict[str, Any]]
    # (index, id) of the events it must reject.
    rejected: list[tuple[int, str]]
    # Every id in the batch, accepted or not.
    ids: list[str]


@dataclass
class Outcome:
    """What one request got: a status and JSON body, or the connection error instead."""

    batch: Batch
    status: int | None = None
    body: Any = None
    request_id: str | None = None
    error: str | None = None


def sized_event(event_id: str, size: int) -> dict[str, Any]:
    """An event whose compact JSON, as the service measures it, is exactly ``size`` bytes."""
    event = {"type": "sized", "id": event_id, "payload": {"blob": ""}}
    event["payload"]["blob"] = "s" * (size - len(orjson.dumps(event)))
    assert len(orjson.dumps(event)) == size
    return event


def make_batches(count: int, tag: str, seed: int = 4) -> list[Batch]:
    """``count`` batches of mixed sizes: mostly small, some of hundreds of events, some with events
    at exactly MAX_EVENT_BYTES, a few with events to reject (one byte too large, or without a type)."""
    rng = random.Random(seed)
    batches = []
    for number in range(count):
        events: list[dict[str, Any]] = []
        invalid: set[int] = set()
        kind = rng.random()
        if kind < 0.55:
            sizes = [rng.randint(60, 600) for _ in range(rng.randint(1, 5))]
        elif kind < 0.8:
            sizes = [rng.randint(60, 300) for _ in range(rng.randint(20, 200))]
        elif kind < 0.92:
            sizes = [rng.randint(2_000, 16_000) for _ in range(rng.randint(1, 4))]
        else:
            sizes = [MAX_EVENT_BYTES] * rng.randint(1, 4)
        for index, size in enumerate(sizes):
            event_id = f"{tag}-{number}-{index}"
            if size == MAX_EVENT_BYTES and index == 1:
                events.append(sized_event(event_id, MAX_EVENT_BYTES + 1))
                invalid.add(index)
            elif kind > 0.5 and index == 3:
                events.append({"id": event_id, "payload": {"no": "type"}})
                invalid.add(index)
            else:
                events.append(sized_event(event_id, size))
        batches.append(
            Batch(
                body=orjson.dumps({"timestamp": 1_716_215_520_000 + number, "events": events}),
                accepted={event["id"]: event for index, event in enumerate(events) if index not in invalid},
                rejected=[(index, events[index]["id"]) for index in sorted(invalid)],
                ids=[event["id"] for event in events],
            )
        )
    return batches


def run_load(
    port: int,
    batches: list[Batch],
    concurrency: int = 32,
    after: tuple[int, Callable[[], None]] | None = None,
) -> list[Outcome]:
    """Send every batch, ``concurrency`` at a time; ``after=(n, action)`` runs ``action`` once n have answered."""
    outcomes = [Outcome(batch) for batch in batches]
    answered = itertools.count(1)

    def one(outcome: Outcome) -> None:
        try:
            outcome.status, headers, outcome.body = send(port, outcome.batch.body)
            outcome.request_id = headers.get("X-Request-ID")
        except (OSError, http.client.HTTPException, ValueError) as error:
            outcome.error = repr(error)
        if after and next(answered) == after[0]:
            after[1]()

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, outcomes))
    return outcomes


def expected_answer(batch: Batch) -> tuple[int, dict[str, Any]]:
    """The status and body (rejections by index and id only) the service owes ``batch``."""
    body: dict[str, Any] = {"success": True, "received": len(batch.accepted)}
    if batch.rejected:
        body["rejected"] = [list(entry) for entry in batch.rejected]
    return 200, body


def summarize(outcome: Outcome) -> tuple[int | None, Any]:
    """An outcome's status and body with each rejection reduced to [index, id], to compare with expected_answer."""
    body = outcome.body
    if isinstance(body, dict) and "rejected" in body:
        body = {**body, "rejected": [[entry["index"], entry.get("id")] for entry in body["rejected"]]}
    return outcome.status, body
