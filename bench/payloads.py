"""Request bodies: realistic events, as a browser's tracker sends them."""

import json
import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from bench import MIB

_PAGES = ["/", "/pricing", "/docs/api", "/blog/routes", "/products/4512", "/checkout"]
_QUERIES = ["rate limits", "gzip", "sessions", "pricing", "webhooks"]
_START = datetime(2024, 5, 20, 14, 32, tzinfo=UTC)


def _payload(kind: str, rng: random.Random) -> dict[str, Any]:
    """A few keys, as a browser's tracker sends them for each kind of event."""
    if kind == "page_view":
        return {"path": rng.choice(_PAGES), "ref": "google"}
    if kind == "click":
        return {"target": "buy", "x": rng.randrange(1280), "y": rng.randrange(800)}
    return {"q": rng.choice(_QUERIES), "hits": rng.randrange(100)}


def make_event(rng: random.Random, index: int = 0) -> dict[str, Any]:
    """One realistic event of about 150 to 200 bytes as compact JSON."""
    kind = rng.choice(["page_view", "click", "search_query"])
    stamp = _START + timedelta(milliseconds=1000 * index + rng.randrange(1000))
    return {
        "type": kind,
        "payload": _payload(kind, rng),
        "userId": f"u_{rng.randrange(10**6):06d}",
        "sessionId": f"s_{rng.getrandbits(32):08x}",
        "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "timestamp": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }


def _dumps(value: Any) -> bytes:
    """Compact JSON, as a browser's JSON.stringify writes it."""
    return json.dumps(value, separators=(",", ":")).encode()


def make_body(batch: int, seed: int = 3) -> bytes:
    """A request body of ``batch`` events, the same for every request of a run."""
    rng = random.Random(seed)
    events = [make_event(rng, index) for index in range(batch)]
    return _dumps({"timestamp": "2024-05-20T14:32:00.000Z", "events": events})


def make_large_body(limit: int = MIB, count: int = 1000, seed: int = 3) -> bytes:
    """A valid batch of ``count`` events (the default MAX_EVENTS) just under ``limit`` bytes (MAX_BODY_BYTES)."""
    rng = random.Random(seed)
    events = [make_event(rng, index) for index in range(count)]
    for event in events:
        event["payload"]["text"] = ""
    spare = limit - len(_dumps({"events": events})) - 64
    filler = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * (spare // count // 57 + 1)
    for event in events:
        event["payload"]["text"] = filler[: spare // count]
    body = _dumps({"events": events})
    assert limit - 4096 < len(body) <= limit, len(body)
    return body
