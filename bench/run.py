"""The benchmark: the service against the floor, side by side, with one command.

    .venv/bin/python bench/run.py [--repeats 3] [--service sync --service gthread:4] [--sink stdout --sink nats]
        [--variant 'NAME:SETTING=VALUE;SETTING=VALUE'] [--header 'User-Agent: ...'] [--profile DIR]

Both servers run under gunicorn with one worker pinned to CPU 0 (the service with
the production gunicorn.conf.py, the floor with bench/floor.py); wrk, this
harness and its helpers run on CPU 1. Only one server is under load at a time.
With ``--sink nats`` a service writes to a local nats-server (started by the
harness, on CPU 1 like the stdout readers) and its events are counted in its
stream, and each nats service is compared with the same one writing to stdout.
With ``--variant`` each service is also run with further ANALYTICS_* settings
(``--variant metrics-off:METRICS=false``) and compared with itself without them.
For each batch size and server: check that the answer is right, warm up, run wrk,
then check that the event lines that reached the server's stdout are the events
wrk saw acknowledged. One table at the end: requests/s, events/s, p50 and p99
latency and the ratio to the floor measured in the same run (medians of the
repeats); the worker's CPU time per request and the same ratio in CPU time,
which other load on a shared machine disturbs less; the cost per request and
per event; and the peak RSS of each worker after a burst of 1 MiB bodies.

It is a benchmark, not a test: CI does not run it. The machine is shared, so
quote medians of several repeats from runs whose "others" column is near zero.
``--code DIR`` runs the service from another tree (``git archive COMMIT | tar
-x -C DIR``) for a before and after; ``--profile DIR`` records py-spy profiles
and summarizes them with bench/profiles.py.
"""

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

if not __package__:
    # Run as a script (python bench/run.py): import the bench package from the repository root, as the tests do.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench import ROOT, BenchError  # noqa: E402
from bench.cli import Options, parse_args  # noqa: E402
from bench.kafkastore import KafkaStore  # noqa: E402
from bench.measure import Measurement, Profiler, measure, measure_rss  # noqa: E402
from bench.natsstore import NatsStore  # noqa: E402
from bench.payloads import make_body, make_large_body  # noqa: E402
from bench.report import (  # noqa: E402
    comparison_lines,
    load_average,
    machine,
    memory_lines,
    progress_line,
    save,
    summarize,
)
from bench.servers import FLOOR_SPEC, Server  # noqa: E402
from bench.wrk import wrk_script  # noqa: E402

# The first seed of the RSS burst's bodies.
RSS_SEEDS = 1000


def run(options: Options, workdir: Path, profiler: Profiler | None) -> tuple[list[Measurement], list[dict[str, Any]]]:
    """Start every server, measure each batch size on each in turn, then the RSS burst; stop them all."""
    specs = [FLOOR_SPEC, *options.services]
    headers = dict(options.headers)
    if options.connection_close:
        headers["Connection"] = "close"
    for batch in options.batches:
        body = workdir / f"b{batch}.json"
        body.write_bytes(make_body(batch))
        (workdir / f"b{batch}.lua").write_text(wrk_script(body, headers))
    measurements: list[Measurement] = []
    memory: list[dict[str, Any]] = []
    with ExitStack() as stack:
        nats = None
        if streams := sum(spec.sink == "nats" for spec in specs):
            nats = NatsStore(workdir, streams)
            stack.callback(nats.stop)
            nats.start()
        kafka = None
        if any(spec.sink == "kafka" for spec in specs):
            kafka = KafkaStore(workdir)
            stack.callback(kafka.stop)
            kafka.start()
        servers = []
        for spec in specs:
            if spec.sink == "nats":
                assert nats
                nats.add_stream(spec.stream, spec.subject)
            if spec.sink == "kafka":
                assert kafka
                kafka.add_topic(spec.topic)
            server = Server(
                spec,
                workdir,
                options.server_cpu,
                options.code,
                nats if spec.sink == "nats" else None,
                kafka if spec.sink == "kafka" else None,
            )
            stack.callback(server.stop)
            server.start()
            servers.append(server)
        for server in servers:
            server.wait_ready()
        for repeat in range(options.repeats):
            # Alternate the order, so that drift on a shared machine does not favour one server.
            order = servers if repeat % 2 == 0 else servers[::-1]
            for batch in options.batches:
                for server in order:
                    body, script = workdir / f"b{batch}.json", workdir / f"b{batch}.lua"
                    m = measure(server, body, script, batch, repeat, options, profiler)
                    measurements.append(m)
                    print(progress_line(m), flush=True)
        if options.rss_requests:
            # Ids of their own in each body, as wrk's: a stream would store a repeated one once. Seeds from
            # RSS_SEEDS, far from make_body's, whose ids (posted by the checks) the same seed would repeat.
            bodies = [make_large_body(seed=RSS_SEEDS + index) for index in range(options.rss_requests)]
            events = len(json.loads(bodies[0])["events"])
            for server in servers:
                memory.append(measure_rss(server, bodies, events, options))
    return measurements, memory


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the table; exit 1 if any check failed."""
    options = parse_args(argv)
    if options.load_cpu is not None:
        # wrk, the stdout readers and py-spy stay off the servers' CPU.
        os.sched_setaffinity(0, {options.load_cpu})
    profiler = None
    if options.profile and options.py_spy:
        native = not options.profile_python_only
        profiler = Profiler(options.py_spy, options.profile, options.profile_rate, native)
    info = machine(options.code)
    command = "bench/run.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"command: {command}")
    print("machine: " + ", ".join(f"{key} {value}" for key, value in info.items()))
    print(f"load average before: {load_average()}", flush=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-") as workdir:
        try:
            measurements, memory = run(options, Path(workdir), profiler)
        except (BenchError, OSError, subprocess.SubprocessError) as error:
            print(f"benchmark failed: {error}", file=sys.stderr)
            return 1
    specs = [FLOOR_SPEC, *options.services]
    print()
    print(summarize(measurements, specs, options.batches, options.repeats))
    if lines := comparison_lines(measurements, specs, options.batches):
        print("Against the same service with the stdout sink, or without the variant's settings (events/s over")
        print("events/s in the same repeat; p99 of each):")
        print("\n".join(lines))
    for line in memory_lines(memory, options.rss_requests):
        print(line)
    problems = [m for m in measurements if m.problems] + [e for e in memory if e["problems"]]
    print(f"event lines: {'every acknowledged event was logged' if not problems else 'CHECKS FAILED, see above'}")
    print(f"load average after: {load_average()}; took {time.monotonic() - started:.0f} s")
    save(options.results, info, command, measurements, memory)
    if profiler:
        # Profiled runs are slower (py-spy pauses the worker for each sample): read them for shares, not speed.
        print(f"\nprofiles in {options.profile} (py-spy raw format; speedscope.app opens them):", flush=True)
        subprocess.run([sys.executable, str(ROOT / "bench" / "profiles.py"), *map(str, profiler.recorded)])
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
