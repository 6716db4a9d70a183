"""tools/drain_nats.py against a real nats-server: every message in the files once, acknowledged only once on disk,
nothing lost when killed and restarted, a clean stop on SIGTERM."""

import asyncio
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import nats
import orjson
import pytest
from nats.js.api import StorageType

from tests.harness.nats import NatsServer, running_server

ROOT = Path(__file__).resolve().parent.parent
DRAIN = ROOT / "tools" / "drain_nats.py"
STREAM = "DRAINTEST"
SUBJECT = "drain.events"


def body(number: int) -> bytes:
    """Message ``number``'s body: an event line as the service writes it, its id telling the stream sequence."""
    return orjson.dumps({"kind": "event", "type": "drained", "id": f"m-{number:06d}", "payload": {"pad": "p" * 80}})


def publish(url: str, count: int) -> None:
    """Create the stream and publish ``count`` messages, each acknowledged by JetStream (sequences 1..count)."""

    async def run() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        await js.add_stream(name=STREAM, subjects=[SUBJECT], storage=StorageType.FILE)
        for start in range(1, count + 1, 500):
            await asyncio.gather(*(js.publish(SUBJECT, body(n)) for n in range(start, min(start + 500, count + 1))))
        await nc.close()

    asyncio.run(run())


def publish_more(url: str, number: int) -> None:
    """Publish message ``number`` to the existing stream."""

    async def run() -> None:
        nc = await nats.connect(url)
        await nc.jetstream().publish(SUBJECT, body(number))
        await nc.close()

    asyncio.run(run())


def consumer_state(url: str, durable: str) -> tuple[int, int, int]:
    """The durable consumer's ack floor (stream sequence), messages awaiting an ack, messages not yet delivered."""

    async def run() -> tuple[int, int, int]:
        nc = await nats.connect(url)
        info = await nc.jetstream().consumer_info(STREAM, durable)
        await nc.close()
        return info.ack_floor.stream_seq, info.num_ack_pending, info.num_pending

    return asyncio.run(run())


def start_drain(url: str, out: Path, *extra: str) -> subprocess.Popen:
    """The drain as a command, its stderr kept for the failure message."""
    command = [sys.executable, str(DRAIN), "--servers", url, "--stream", STREAM, "--durable", "files"]
    return subprocess.Popen(
        [*command, "--out", str(out), *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT
    )


def written(out: Path) -> list[bytes]:
    """The lines of every file, in the files' order (a torn last line left out)."""
    lines = []
    for path in sorted(out.glob("events-*.ndjson")):
        lines += path.read_bytes().split(b"\n")[:-1]
    return lines


def wait_for_lines(out: Path, count: int, drain: subprocess.Popen, timeout: float = 30) -> list[bytes]:
    """The files' lines once ``count`` different ones are there; fails if the drain exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while len(set(lines := written(out))) < count:
        assert drain.poll() is None, drain.stderr.read().decode() if drain.stderr else ""
        assert time.monotonic() < deadline, f"{len(set(lines))} of {count} lines after {timeout} s"
        time.sleep(0.005)
    return lines


def stop(drain: subprocess.Popen) -> str:
    """SIGTERM the drain; its stderr once it has exited 0."""
    drain.send_signal(signal.SIGTERM)
    _, stderr = drain.communicate(timeout=15)
    assert drain.returncode == 0, stderr.decode()
    return stderr.decode()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    """One nats-server with JetStream, for this test alone."""
    with running_server(tmp_path) as running:
        yield running


def test_every_message_once_in_order_in_rotated_files_then_a_clean_stop(server: NatsServer, tmp_path: Path) -> None:
    """Every message is a line once, in stream order, in files of at most --max-bytes; after SIGTERM the
    consumer has nothing pending or unacknowledged, and a restart writes nothing again."""
    count = 3000
    publish(server.url, count)
    out = tmp_path / "out"
    drain = start_drain(server.url, out, "--max-bytes", "40000", "--batch", "64")
    lines = wait_for_lines(out, count, drain)
    stop(drain)

    assert lines == [body(n) for n in range(1, count + 1)]
    files = sorted(out.glob("events-*.ndjson"))
    assert len(files) >= count * len(body(1)) // 40000
    assert all(0 < path.stat().st_size <= 40000 for path in files)
    assert consumer_state(server.url, "files") == (count, 0, 0)

    # Restarted, it carries on from the durable consumer: one more message, and only it, is written.
    drain = start_drain(server.url, out)
    publish_more(server.url, count + 1)
    assert wait_for_lines(out, count + 1, drain) == [*lines, body(count + 1)]
    stop(drain)
    assert written(out) == [*lines, body(count + 1)]


def test_killed_mid_way_and_restarted_loses_nothing(server: NatsServer, tmp_path: Path) -> None:
    """SIGKILL part way through, a torn line added as a crash mid-write would leave it, then a restart: every
    message acknowledged before the kill was on disk, every message ends up in the files, and the only copies
    are of messages written but not acknowledged when the drain died (one batch at most)."""
    count, batch = 8000, 20
    publish(server.url, count)
    out = tmp_path / "out"
    drain = start_drain(server.url, out, "--batch", str(batch), "--ack-wait", "1")
    wait_for_lines(out, count // 10, drain)
    drain.kill()
    drain.wait(10)
    before = written(out)
    ack_floor, unacked, _ = consumer_state(server.url, "files")
    assert len(before) < count, "the drain finished before it was killed: nothing was tested"
    assert unacked <= batch
    # Acknowledged means on disk: the ack floor's messages are all in the files.
    assert before[:ack_floor] == [body(n) for n in range(1, ack_floor + 1)]
    with sorted(out.glob("events-*.ndjson"))[-1].open("ab") as last:
        last.write(body(ack_floor + 1)[:30])

    drain = start_drain(server.url, out, "--batch", str(batch))
    lines = wait_for_lines(out, count, drain)
    stderr = stop(drain)

    assert "cut a partial line" in stderr
    assert all(orjson.loads(line)["type"] == "drained" for line in lines)
    assert set(lines) == {body(n) for n in range(1, count + 1)}
    copies = Counter(lines) - Counter(set(lines))
    assert set(copies) <= set(before[ack_floor:])
    assert sum(copies.values()) <= batch
    assert consumer_state(server.url, "files") == (count, 0, 0)
