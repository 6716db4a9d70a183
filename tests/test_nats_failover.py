"""Failover under load: the three-node cluster of deploy/nats-cluster/, the stream on 3 replicas, 4 gunicorn workers
with the nats sink, the stream leader's node killed and restarted mid-load, then SIGTERM to gunicorn mid-load."""

import asyncio
import http.client
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import orjson
from nats.js.api import AckPolicy, ConsumerConfig

from config import Config
from tests.harness.clients import send
from tests.harness.nats import running_cluster, wait_for_stream_leader

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "deploy" / "nats-cluster"
STREAM = Config.NATS_STREAM
ACK_TIMEOUT = Config.NATS_ACK_TIMEOUT
CLIENTS = 6
# The timeline, in seconds: the leader's node killed this long after the load began; brought back once a new
# leader is elected (JetStream's RAFT takes about 4 to 9 s) but not before RESTART_AT; gunicorn sent SIGTERM
# this long after the restart, so that the load runs against the healed cluster too.
KILL_AT, RESTART_AT, SIGTERM_AFTER = 4.0, 9.0, 4.0
# Beyond the ack timeout (which bounds the sink's wait from the hand-over on), what an answer may take on a busy
# machine: the rest of the request and scheduling. Far below gunicorn's timeout, so a request stuck on the engine
# would show.
LATENCY_SLACK = 3.0


@dataclass
class Answer:
    """One request: when it was sent, how long it took, and what came back (or the connection error)."""

    batch: str
    events: int
    sent: float
    took: float
    status: int | None
    retry_after: str | None
    body: Any
    error: str | None = None


@dataclass
class Load:
    """Clients posting batches with ids until told to stop, each retrying a batch answered 503 (as analytics.js
    does, but at once: the service has to cope). Every answer is kept."""

    port: int
    answers: list[Answer] = field(default_factory=list)
    # Event ids by batch name.
    batches: dict[str, list[str]] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    sigterm_sent: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def client(self, number: int) -> None:
        """Post batches of 1 to 25 events until ``stop``, or until a refused connection after SIGTERM."""
        rng = random.Random(number)
        sequence = 0
        while not self.stop.is_set():
            name = f"c{number}-{sequence}"
            sequence += 1
            ids = [f"{name}-{index}" for index in range(rng.choice((1, 2, 5, 10, 25)))]
            body = orjson.dumps({"events": [{"type": "failover", "id": event_id} for event_id in ids]})
            with self.lock:
                self.batches[name] = ids
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    status, headers, answer = send(self.port, body)
                    retry_after = headers.get("Retry-After")
                    error = None
                except (OSError, http.client.HTTPException) as failure:
                    status = retry_after = answer = None
                    error = repr(failure)
                with self.lock:
                    self.answers.append(
                        Answer(name, len(ids), sent, time.monotonic() - sent, status, retry_after, answer, error)
                    )
                if error and self.sigterm_sent.is_set():
                    return
                if status != 503:
                    break


def read_all(urls: list[str], stream: str, timeout: float = 30) -> list[tuple[bytes, dict[str, str]]]:
    """Every message the stream holds (body and headers), in order, read by a consumer that acknowledges nothing:
    tens of thousands in a second, where acknowledging each would take many."""

    async def read() -> list[tuple[bytes, dict[str, str]]]:
        nc = await nats.connect(urls, connect_timeout=1, reconnect_time_wait=0.1, max_reconnect_attempts=-1)
        try:
            js = nc.jetstream(timeout=5)
            total = (await js.stream_info(stream)).state.messages
            config = ConsumerConfig(ack_policy=AckPolicy.NONE, inactive_threshold=30, num_replicas=1, mem_storage=True)
            subscription = await js.pull_subscribe("", stream=stream, config=config)
            messages: list[tuple[bytes, dict[str, str]]] = []
            while len(messages) < total:
                try:
                    fetched = await subscription.fetch(min(1000, total - len(messages)), timeout=1)
                except TimeoutError:
                    continue
                messages += [(message.data, dict(message.headers or {})) for message in fetched]
            return messages
        finally:
            await nc.close()

    return asyncio.run(asyncio.wait_for(read(), timeout))


def at(start: float, second: float) -> None:
    """Wait until ``second`` seconds after ``start``: the scenario's timeline, not a wait for a condition."""
    time.sleep(max(0.0, start + second - time.monotonic()))


def test_leader_killed_and_restarted_then_sigterm_under_load(start_server, tmp_path, record_property):
    """Every event of every batch answered 200 is in the stream exactly once; during the failover the answers are
    200, or 503 {"error": "Event store unavailable"} with Retry-After, none slower than the ack timeout allows;
    after SIGTERM mid-load gunicorn exits 0 and still nothing acknowledged is missing."""
    with running_cluster(tmp_path, templates=TEMPLATES) as cluster:
        env = {
            "ANALYTICS_SINKS": "nats",
            "ANALYTICS_NATS_SERVERS": cluster.servers_setting,
            "ANALYTICS_NATS_REPLICAS": "3",
        }
        server = start_server(workers=4, env=env)
        leader = wait_for_stream_leader(cluster.urls, STREAM)

        load = Load(server.port)
        clients = [threading.Thread(target=load.client, args=(number,)) for number in range(CLIENTS)]
        start = time.monotonic()
        for thread in clients:
            thread.start()
        try:
            at(start, KILL_AT)
            # The leader may have moved since the load began: kill the one leading now.
            leader = wait_for_stream_leader(cluster.urls, STREAM)
            killed = time.monotonic()
            cluster.node(leader).kill()
            survivors = [node.url for node in cluster.nodes if node.name != leader]
            new_leader = wait_for_stream_leader(survivors, STREAM, not_on=leader)
            elected = time.monotonic()
            at(start, RESTART_AT)
            cluster.node(leader).start()
            restarted = time.monotonic()
            at(restarted, SIGTERM_AFTER)
            stopping = time.monotonic()
            load.sigterm_sent.set()
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(30) == 0
        finally:
            load.stop.set()
            for thread in clients:
                thread.join(30)
        server.stop()
        messages = read_all(cluster.urls, STREAM)
    assert [(data, headers) for data, headers in messages if orjson.loads(data)["id"] != headers["Nats-Msg-Id"]] == []
    stored = Counter(orjson.loads(data)["id"] for data, _ in messages)

    answers = load.answers
    refused = [answer for answer in answers if answer.error]
    # Connections refused or cut only once gunicorn was told to stop.
    assert [a.error for a in refused if a.sent + a.took < stopping] == []
    assert [(a.status, a.body) for a in answers if a.status not in (200, 503, None)] == []
    assert [a.body for a in answers if a.status == 200 and a.body != {"success": True, "received": a.events}] == []
    unavailable = [answer for answer in answers if answer.status == 503]
    assert [(a.body, a.retry_after) for a in unavailable if a.body != {"error": "Event store unavailable"}] == []
    assert [a.retry_after for a in unavailable if not (a.retry_after or "").isdigit()] == []
    slowest = max(answer.took for answer in answers if answer.status)
    assert slowest < ACK_TIMEOUT + LATENCY_SLACK, f"an answer took {slowest:.1f} s"

    acknowledged = {event_id for a in answers if a.status == 200 for event_id in load.batches[a.batch]}
    assert acknowledged - stored.keys() == set(), "acknowledged events missing from the stream"
    assert [event_id for event_id, times in stored.items() if times > 1] == []
    assert stored.keys() <= {event_id for ids in load.batches.values() for event_id in ids}
    # The scenario happened as planned: 200s before the kill, after the new leader's election, after the restart.
    assert any(a.status == 200 and a.sent + a.took < killed for a in answers)
    assert any(a.status == 200 and a.sent > elected for a in answers)
    assert any(a.status == 200 and a.sent > restarted for a in answers)

    first_503 = min((a.sent for a in unavailable), default=killed)
    last_503 = max((a.sent + a.took for a in unavailable), default=killed)
    report = {
        "killed": leader,
        "new_leader": new_leader,
        "election_s": round(elected - killed, 2),
        "answers": len(answers),
        "answers_503": len(unavailable),
        "503s_from_s_after_kill": round(first_503 - killed, 2),
        "503s_until_s_after_kill": round(last_503 - killed, 2),
        "restart_s_after_kill": round(restarted - killed, 2),
        "slowest_answer_s": round(slowest, 2),
        "events_posted": sum(len(ids) for ids in load.batches.values()),
        "events_acknowledged": len(acknowledged),
        "events_in_stream": sum(stored.values()),
    }
    record_property("failover", report)
    print(f"failover: {report}")


def test_the_docs_show_the_cluster_configuration_this_test_runs():
    """docs/nats.md shows n1.conf as it is, without its comments, so the page cannot drift from the tested file."""
    page = (ROOT / "docs" / "nats.md").read_text()
    shown = page.split("n1.conf, with the placeholders:\n\n```\n", 1)[1].split("```", 1)[0]
    lines = (TEMPLATES / "n1.conf").read_text().splitlines(keepends=True)
    assert shown == "".join(line for line in lines if not line.lstrip().startswith("#"))
