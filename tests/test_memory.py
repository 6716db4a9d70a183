"""A worker's memory stays bounded whatever clients send: nothing keyed by, or left over from, their input piles up.

One real gunicorn worker is fed a few hundred requests of the shapes that cost
the most memory: long keys, many distinct keys, keys Python stores at four
bytes a character, deep payloads, long X-Forwarded-For hops, invalid events
whose errors echo their keys or hold their data, and gzip bodies that inflate to
the limit. Its resident memory is read from /proc after every request (what it
holds on to) and at the end for its peak (what one request may take).
"""

import gzip
from collections.abc import Iterator
from typing import Any

import orjson

from config import Config
from tests.harness.memory import MAX_HELD_KIB, memory_kib

# What it may reach while serving one: parsing a MAX_BODY_BYTES body of empty arrays
# alone takes about 34 MiB (350,000 lists), gone again once the request is done.
MAX_PEAK_KIB = 80 * 1024
MAX_BODY = Config.MAX_BODY_BYTES
# One such character in a key and Python stores the whole key at four bytes a character.
WIDE = "\U0001f600"
JSON = {"Content-Type": "application/json"}
GZIP = {**JSON, "Content-Encoding": "gzip"}

# A shape's request: its name, body, headers and the status it must get.
Request = tuple[str, bytes, dict[str, str], int]


def batch(events: list[Any]) -> bytes:
    """A request body holding ``events``, within MAX_BODY_BYTES."""
    body = orjson.dumps({"events": events})
    assert len(body) <= MAX_BODY
    return body


def long_distinct_keys(number: int) -> Request:
    """Forty valid events of three distinct 8,000-character keys each, which Python holds at 4 bytes a character."""
    events = [
        {"type": "wide", "payload": {f"{WIDE}{number}.{index}.{key}" + "z" * 8000: 1 for key in range(3)}}
        for index in range(40)
    ]
    return "long distinct keys", gzip.compress(batch(events)), GZIP, 200


def many_short_keys(number: int) -> Request:
    """Thirty valid events of 130 distinct 64-character keys each: as long as a key can be and still be cached."""
    events = [
        {"type": "short", "payload": {f"{number:05}{index:03}{key:03}".ljust(64, WIDE): 1 for key in range(130)}}
        for index in range(30)
    ]
    return "many short keys", gzip.compress(batch(events)), GZIP, 200


def one_huge_key(number: int) -> Request:
    """One event whose one payload key fills the body: too large to log, so rejected."""
    key = f"{WIDE}{number}" + "k" * (MAX_BODY - 200)
    return "one huge key", gzip.compress(batch([{"type": "huge", "payload": {key: 1}}])), GZIP, 400


def bad_timestamp(number: int) -> Request:
    """A batch refused whole for its timestamp, whose one event has a key filling the body."""
    key = f"{WIDE}{number}" + "t" * (MAX_BODY - 200)
    body = batch([{"type": "late", "payload": {key: 1}}]).replace(b"{", b'{"timestamp":"never",', 1)
    return "bad timestamp", gzip.compress(body), GZIP, 400


def echoed_keys(number: int) -> Request:
    """Three hundred invalid events, each with an unknown field of 1,000 characters that the answer names."""
    events = [{"type": "bad", f"{number}.{index}" + "é" * 1000: 1} for index in range(300)]
    return "echoed keys", gzip.compress(batch(events)), GZIP, 400


def nested_arrays(number: int) -> Request:
    """An event of 350,000 empty arrays, the most Python objects a body can make: too large, so rejected."""
    body = b'{"events":[{"type":"arrays","payload":{"n":%d,"a":[' % number + b"[]," * 349_000 + b"[]]}}]}"
    return "nested arrays", gzip.compress(body), GZIP, 400


def nested_objects(number: int) -> Request:
    """1 MiB of one-key objects nested fifty deep beside the events, the most memory a body can make (38 MiB of
    dicts, a peak past 90 MiB): refused before it is parsed."""
    nest = b'{"":' * 50 + b"%d" % number + b"}" * 50
    body = b'{"events":[],"x":[' + b",".join([nest] * (MAX_BODY // (len(nest) + 1) - 1)) + b"]}"
    return "nested objects", gzip.compress(body), GZIP, 413


def deep_payload(number: int) -> Request:
    """An event nested as deep as a line can be, and one nested as deep as parsing allows (rejected)."""
    deep: Any = number
    for _ in range(250):
        deep = {f"d{number}": deep}
    # Written by hand: orjson writes no more than 254 levels.
    deeper = b'{"type":"deeper","payload":{"a":' + b"[" * 1000 + b"]" * 1000 + b"}}"
    body = b'{"events":[' + orjson.dumps({"type": "deep", "payload": deep}) + b"," + deeper + b"]}"
    return "deep payload", body, JSON, 200


def forwarded_hops(number: int) -> Request:
    """A small event whose X-Forwarded-For (believed from loopback) has 200 distinct hops, the last 4,000 characters."""
    hops = ", ".join([*(f"10.{number % 256}.{hop}.1" for hop in range(200)), f"{number}." + "h" * 4000])
    return "forwarded hops", batch([{"type": "hops"}]), {**JSON, "X-Forwarded-For": hops}, 200


def gzip_bomb(number: int) -> Request:
    """A gzip body that inflates past MAX_BODY_BYTES."""
    return "gzip bomb", gzip.compress(b" " * MAX_BODY + f'{{"events":[{number}]}}'.encode()), GZIP, 413


# Each shape and how many requests of it, in this order: the long keys first, so that
# nothing sent later can push them out of a bounded cache before they are measured.
SHAPES = {
    long_distinct_keys: 20,
    many_short_keys: 30,
    one_huge_key: 20,
    bad_timestamp: 20,
    echoed_keys: 20,
    nested_arrays: 10,
    nested_objects: 10,
    deep_payload: 30,
    forwarded_hops: 100,
    gzip_bomb: 10,
}


def requests() -> Iterator[Request]:
    """Every shape's requests, one shape after the other."""
    for shape, count in SHAPES.items():
        yield from map(shape, range(count))


def test_worker_memory_stays_bounded(start_server):
    """A few hundred of the costliest requests: the worker never holds more than MAX_HELD_KIB between
    them, nor reaches more than MAX_PEAK_KIB while serving one."""
    server = start_server(workers=1)
    (worker,) = server.worker_pids()
    held = {}
    for name, body, headers, expected in requests():
        status, _, answer = server.post("/api/analytics", body, headers)
        assert status == expected, (name, status, answer)
        held[name] = max(held.get(name, 0), memory_kib(worker)["VmRSS"])
        # Drop the log as it comes, so that this process does not hold it all.
        server.stdout.clear()
    # The same worker served them all: a replaced one would have started afresh.
    assert server.worker_pids() == {worker}
    assert max(held.values()) < MAX_HELD_KIB, held
    assert memory_kib(worker)["VmHWM"] < MAX_PEAK_KIB, held
