"""Drain a JetStream stream into NDJSON files, one message body a line, for a warehouse to load.

    python tools/drain_nats.py --servers nats://127.0.0.1:4222 --stream ANALYTICS --durable drain --out DIR

A durable pull consumer fetches a batch, its bodies are appended to the current file, the file is
flushed to disk (``fsync``), and only then is the batch acknowledged; the last acknowledgement of a
batch waits for the server's answer before the next fetch. So:

- nothing is acknowledged that is not on disk: killed at any moment (SIGKILL, power loss), the
  drain loses nothing, and a restart with the same ``--durable`` carries on where it stopped;
- a message can be written twice only if it was written but not yet acknowledged when the drain
  died (at most one batch: the server delivers it again once the consumer's ack wait has passed).
  The service's lines carry the event's ``id``, so a load into a warehouse can drop such copies;
- a line the drain was writing when it died is cut off at the next start (its message was not
  acknowledged, so it comes again).

SIGTERM or SIGINT stops it cleanly: the batch in hand is written and acknowledged, then it exits 0.
A new file starts on every start, every UTC hour and before a file would pass ``--max-bytes``;
names (``events-<UTC hour>-<number>.ndjson``) sort in the order they were written.
"""

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

PATTERN = "events-*.ndjson"


def log(message: str) -> None:
    """One diagnostic line on stderr."""
    print(f"drain_nats: {message}", file=sys.stderr, flush=True)


def cut_partial_lines(out: Path) -> None:
    """Cut every file in ``out`` back to its last complete line: a torn last line belongs to a message
    that was never acknowledged, and will be written again whole."""
    for path in out.glob(PATTERN):
        with path.open("r+b") as file:
            size = file.seek(0, os.SEEK_END)
            if size == 0:
                continue
            file.seek(size - 1)
            if file.read(1) == b"\n":
                continue
            file.seek(0)
            keep = file.read().rfind(b"\n") + 1
            file.truncate(keep)
            os.fsync(file.fileno())
            log(f"cut a partial line from {path.name}: {size - keep} bytes")


class Files:
    """The NDJSON files: appends a batch and has it on disk before returning."""

    def __init__(self, out: Path, max_bytes: int) -> None:
        self.out = out
        self.max_bytes = max_bytes
        numbers = [int(path.stem.rsplit("-", 1)[1]) for path in out.glob(PATTERN)]
        self.number = max(numbers, default=0)
        self.fd: int | None = None
        self.hour = ""
        self.size = 0

    def write(self, data: bytes) -> None:
        """Append ``data`` (whole lines) to the current file, starting a new one first when due; fsync."""
        hour = time.strftime("%Y%m%dT%H", time.gmtime())
        if self.fd is None or hour != self.hour or (self.size and self.size + len(data) > self.max_bytes):
            self._open(hour)
        assert self.fd is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        os.fsync(self.fd)
        self.size += len(data)

    def _open(self, hour: str) -> None:
        self.close()
        self.number += 1
        path = self.out / f"events-{hour}-{self.number:06d}.ndjson"
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        # The new name must survive a crash as well as the lines in it.
        directory = os.open(self.out, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        self.hour, self.size = hour, 0

    def close(self) -> None:
        """Close the current file, if any."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


async def log_error(error: Exception) -> None:
    """The client's error callback: the connection's troubles, on stderr."""
    log(f"connection: {error!r}")


async def wait(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less if ``stop`` is set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


async def subscribe(js: nats.js.JetStreamContext, args: argparse.Namespace, stop: asyncio.Event):
    """The pull subscription on the durable consumer, created if missing; retried until it works or ``stop``."""
    while not stop.is_set():
        try:
            try:
                await js.consumer_info(args.stream, args.durable)
            except nats.js.errors.NotFoundError:
                config = ConsumerConfig(
                    durable_name=args.durable,
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=args.ack_wait,
                    filter_subject=args.subject,
                )
                await js.add_consumer(args.stream, config)
            return await js.pull_subscribe_bind(durable=args.durable, stream=args.stream)
        except (TimeoutError, nats.errors.Error) as error:
            # The stream may not exist yet, or be electing a leader.
            log(f"cannot use consumer {args.durable} on stream {args.stream} yet: {error!r}")
            await wait(stop, 1)
    return None


async def deliver(messages: list[Msg], files: Files) -> int:
    """Write ``messages`` to disk, then acknowledge them; the number written."""
    kept = []
    for message in messages:
        if b"\n" in message.data:
            # Not one line: writing it would break the files' format. Tell the server never to send it again.
            log(f"dropped message {message.metadata.sequence.stream}: its body holds a line break")
            await message.term()
        else:
            kept.append(message)
    if not kept:
        return 0
    files.write(b"".join(message.data + b"\n" for message in kept))
    for message in kept[:-1]:
        await message.ack()
    # Waits for the server: it takes a connection's messages in order, so every ack above has arrived too,
    # and the next batch is fetched only once this one is known to be acknowledged.
    await kept[-1].ack_sync(timeout=5)
    return len(kept)


async def drain(args: argparse.Namespace, stop: asyncio.Event) -> int:
    """Fetch, write and acknowledge until ``stop`` is set; the number of lines written."""
    args.out.mkdir(parents=True, exist_ok=True)
    cut_partial_lines(args.out)
    files = Files(args.out, args.max_bytes)
    nc = None
    written = 0
    try:
        while nc is None and not stop.is_set():
            try:
                nc = await nats.connect(
                    servers=args.servers.split(","),
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    connect_timeout=2,
                    error_cb=log_error,
                )
            except (OSError, TimeoutError, nats.errors.Error) as error:
                log(f"cannot connect to {args.servers}: {error!r}")
                await wait(stop, 1)
        if nc is None:
            return written
        subscription = await subscribe(nc.jetstream(), args, stop)
        while subscription is not None and not stop.is_set():
            try:
                messages = await subscription.fetch(args.batch, timeout=args.fetch_timeout)
            except TimeoutError:
                # Nothing came within the fetch's time (nats-py raises both its own and asyncio's kind).
                continue
            except nats.errors.Error as error:
                # A reconnect or a leader election under way: fetch again shortly.
                log(f"fetch failed: {error!r}")
                await wait(stop, 0.5)
                continue
            try:
                written += await deliver(messages, files)
            except (TimeoutError, nats.errors.Error) as error:
                # Written but not known to be acknowledged: the server may deliver these again (a copy, not a loss).
                log(f"acknowledging failed, the batch may come again: {error!r}")
    finally:
        files.close()
        if nc is not None:
            await nc.close()
    return written


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--servers", default="nats://127.0.0.1:4222", help="comma list of nats:// URLs")
    parser.add_argument("--stream", default="ANALYTICS")
    parser.add_argument("--durable", default="drain", help="the durable consumer's name: the place to resume from")
    parser.add_argument("--subject", default=None, help="only messages on this subject (default: all the stream's)")
    parser.add_argument("--out", type=Path, required=True, help="directory of the NDJSON files")
    parser.add_argument("--max-bytes", type=int, default=64 << 20, help="start a new file before passing this size")
    parser.add_argument("--batch", type=int, default=256, help="messages fetched, written and acknowledged at once")
    parser.add_argument("--fetch-timeout", type=float, default=1.0, help="seconds a fetch waits for messages")
    parser.add_argument(
        "--ack-wait",
        type=float,
        default=30.0,
        help="seconds before an unacknowledged message comes again (used when the consumer is created)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run until SIGTERM or SIGINT; exit 0 after a clean stop."""
    args = parse(argv)

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        return await drain(args, stop)

    written = asyncio.run(run())
    log(f"stopped after writing {written} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
