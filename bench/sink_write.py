"""Time the NATS sink's ``write`` in-process against a local nats-server: per batch, median and p99, and CPU.

    .venv/bin/python bench/sink_write.py [--writes 2000] [--batches 1,10,100] [--module OTHER.py ...]
        [--cpu 0] [--between 600]

One nats-server (file storage, one replica, its own temporary store) and one
``JetStreamSink`` per module: the tree's ``analytics/jetstream.py`` and any
``--module`` given (e.g. an older version, ``git show COMMIT:analytics/jetstream.py
> /tmp/old.py``), each with its own stream, measured in turns in the same run so
that a shared machine's drift falls on all of them alike. Every write carries new
event ids (a repeated id would be a duplicate, which JetStream acknowledges
without storing), and the streams' message counts are checked at the end.

The CPU column is this process's CPU time per write (the writing thread and the
sink's loop thread) beyond ``--between``. A worker does a request's own work
between two writes, on one CPU: ``--cpu 0 --between 600`` pins the writer and
the sink's thread to CPU 0 (the server stays where it was started, the others)
and spins 600 µs of Python between writes, which shows what the hand-over between
the two threads costs when the loop's thread wakes while the request's runs (the
GIL): the sink's loop thread must not be left with work once a write returns.
"""

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

if not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import orjson  # noqa: E402

from analytics.eventlog import Batch  # noqa: E402
from bench.payloads import make_body  # noqa: E402
from tests.harness.nats import NatsServer, stream_info  # noqa: E402


def load(path: Path, name: str) -> ModuleType:
    """A sink module from a file, under its own name."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def batches(size: int, count: int) -> list[Batch]:
    """``count`` batches of ``size`` realistic events, every event with an id of its own."""
    template = orjson.loads(make_body(size))["events"]
    made = []
    for _ in range(count):
        events = [event | {"id": str(uuid.uuid4())} for event in template]
        made.append(Batch(events, b"".join(orjson.dumps({"kind": "event", **event}) + b"\n" for event in events)))
    return made


def spin(microseconds: float) -> None:
    """Keep the CPU (and the GIL) busy for this long, as a request's own work would."""
    end = time.perf_counter() + microseconds / 1e6
    while time.perf_counter() < end:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Measure each module's sink at each batch size; print median and p99 per write, and events/s."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writes", type=int, default=2000, help="timed writes per sink and batch size")
    parser.add_argument("--batches", default="1,10,100")
    parser.add_argument("--rounds", type=int, default=4, help="turns per sink and batch size (writes split among them)")
    parser.add_argument("--module", type=Path, action="append", default=[], help="another jetstream.py to compare")
    parser.add_argument("--cpu", type=int, help="pin the writer and the sinks' threads to this CPU (not the server)")
    parser.add_argument("--between", type=float, default=0.0, help="µs of Python work between two writes")
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parent.parent
    modules = {"tree": root / "analytics" / "jetstream.py"} | {f"m{i}:{p.name}": p for i, p in enumerate(args.module)}
    with tempfile.TemporaryDirectory(prefix="sink-write-") as tmp:
        server = NatsServer(Path(tmp)).start()
        if args.cpu is not None:
            # This thread only, so the server keeps its CPUs; the sinks' threads, started below, inherit it.
            os.sched_setaffinity(0, {args.cpu})
        sinks = {}
        try:
            for index, (label, path) in enumerate(modules.items()):
                module = load(path, f"sink_module_{index}")
                sink = module.JetStreamSink([server.url], f"BENCH{index}", f"bench.{index}", 1, 120.0, 2.0)
                sink.start()
                if sink.unready_reason():
                    raise SystemExit(f"{label}: {sink.unready_reason()}")
                sinks[label] = sink
            expected = dict.fromkeys(sinks, 0)
            for size in (int(b) for b in args.batches.split(",")):
                per_round = max(1, args.writes // args.rounds)
                times: dict[str, list[float]] = {label: [] for label in sinks}
                cpu = dict.fromkeys(sinks, 0.0)
                for _ in range(args.rounds):
                    for label, sink in sinks.items():
                        work = batches(size, per_round + per_round // 10)
                        for batch in work[: per_round // 10]:
                            sink.write(batch)  # warm-up
                        timed = work[per_round // 10 :]
                        cpu_started = time.process_time()
                        for batch in timed:
                            started = time.perf_counter()
                            sink.write(batch)
                            times[label].append(time.perf_counter() - started)
                            spin(args.between)
                        cpu[label] += time.process_time() - cpu_started - len(timed) * args.between / 1e6
                        expected[label] += len(work) * size
                for label, values in times.items():
                    values.sort()
                    median = statistics.median(values)
                    p99 = values[int(0.99 * (len(values) - 1))]
                    print(
                        f"batch {size:4} {label:24} median {1e6 * median:8.0f} µs  p99 {1e6 * p99:8.0f} µs  "
                        f"CPU {1e6 * cpu[label] / len(values):6.0f} µs  "
                        f"{size / statistics.fmean(values):10,.0f} events/s (one writer)",
                        flush=True,
                    )
            for index, label in enumerate(sinks):
                stored = stream_info([server.url], f"BENCH{index}").state.messages
                verdict = "ok" if stored == expected[label] else "MISMATCH"
                print(f"{label}: {stored} stored for {expected[label]} written: {verdict}")
        finally:
            for sink in sinks.values():
                sink.close()
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
