"""Round two's road not taken: a batch decoded by msgspec straight from the body's bytes into typed events.

    .venv/bin/python bench/decode_paths.py [--batches 1,10,100] [--rounds 9]

The service parses a body with orjson, then checks the batch's dicts at once
(``Ingestor.fast_load_all``: msgspec's conversion, the timestamps, the sizes).
msgspec can instead decode the bytes into Structs in one compiled pass, which
checks as it goes; the events must then become dicts with naive UTC times, as
the rest of the service takes them. This prints both paths' least CPU time per
event over ``--rounds`` rounds (a batch's own cost shared out among its
events: most of it at one event), and then why the second would need more than
speed: on the same valid JSON, msgspec and orjson disagree on what a line holds.
"""

import argparse
import math
import random
import struct
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

if not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import msgspec  # noqa: E402
import orjson  # noqa: E402

from analytics.fastload import _field_checks  # noqa: E402
from analytics.ingest import Ingestor, load_batch  # noqa: E402
from analytics.lines import TIME_OPTIONS  # noqa: E402
from analytics.timestamps import naive_utc  # noqa: E402
from bench.payloads import make_body  # noqa: E402


def typed_decoder(ingestor: Ingestor) -> Callable[[bytes], list[dict[str, Any]]]:
    """Decode a body into the events as the service loads them, through Structs derived from EventSchema's
    fields (as fastload derives its own), timestamps decoded by msgspec as datetimes."""
    fields = [
        (name, datetime | None if name == "timestamp" else check.annotation, None)
        for name, check in _field_checks(ingestor.schema).items()
    ]
    event = msgspec.defstruct("Event", fields, forbid_unknown_fields=True)
    batch = msgspec.defstruct("Batch", [("events", list[event]), ("timestamp", datetime | None, None)])
    decoder = msgspec.json.Decoder(batch)
    asdict = msgspec.structs.asdict

    def decode(body: bytes) -> list[dict[str, Any]]:
        events = []
        for decoded in decoder.decode(body).events:
            loaded = {key: value for key, value in asdict(decoded).items() if value is not None}
            timestamp = loaded.get("timestamp")
            if timestamp is not None and timestamp.tzinfo is not None:
                loaded["timestamp"] = naive_utc(timestamp)
            events.append(loaded)
        return events

    return decode


def least_cpu_per_event(work: Callable[[], Any], events: int, rounds: int) -> float:
    """The least of ``rounds`` rounds of this process's CPU time per event, in µs."""
    calls = max(20, 20000 // events)
    best = math.inf
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(calls):
            work()
        best = min(best, (time.process_time() - start) / calls / events * 1e6)
    return best


def disagreements(samples: int = 100_000) -> tuple[int, list[str]]:
    """How many of ``samples`` random finite doubles the two write differently, and JSON numbers they read as
    different values."""
    rng = random.Random(15)
    doubles = (struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0] for _ in range(samples))
    written = sum(orjson.dumps(x) != msgspec.json.encode(x) for x in doubles if math.isfinite(x))
    numbers = [b"18446744073709551616", b"-9223372036854775809", b"123456789012345678901234567890"]
    # Compared as written back: 2**64 read as a float equals the integer, yet the line would say 1.8446744073709552e+19.
    read = [number.decode() for number in numbers if repr(orjson.loads(number)) != repr(msgspec.json.decode(number))]
    return written, read


def main() -> None:
    """Print each batch size's CPU per event on both paths, then where they disagree."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,10,100", help="events per request, comma-separated")
    parser.add_argument("--rounds", type=int, default=9, help="rounds per path and batch size (default 9)")
    args = parser.parse_args()
    import app as service_module

    ingestor: Ingestor = service_module.create_app().extensions["ingestor"]
    decode = typed_decoder(ingestor)

    def checked_now(body: bytes) -> list[dict[str, Any]]:
        events = ingestor.fast_load_all(load_batch(orjson.loads(body))[0])
        assert events is not None, "the bench's batch is plainly valid"
        return events

    print("batch | orjson + checks µs/event | msgspec typed µs/event | typed over now")
    for batch in (int(size) for size in args.batches.split(",")):
        body = make_body(batch)
        # Both load the same events: the comparison is of like with like.
        assert orjson.dumps(decode(body), option=TIME_OPTIONS) == orjson.dumps(checked_now(body), option=TIME_OPTIONS)
        now = least_cpu_per_event(lambda body=body: checked_now(body), batch, args.rounds)
        typed = least_cpu_per_event(lambda body=body: decode(body), batch, args.rounds)
        print(f"{batch} | {now:.2f} | {typed:.2f} | {typed / now:.2f}", flush=True)
    written, read = disagreements()
    print(f"random doubles written differently: {written} of 100000 (msgspec 1e16, orjson 1e+16)")
    print(f"numbers read as different values: {', '.join(read) or 'none'} (orjson: a float; msgspec: the integer)")


if __name__ == "__main__":
    main()
