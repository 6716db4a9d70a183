"""docs/kafka.md's ClickHouse tables, run in chDB (ClickHouse in-process) on the records the service wrote to a
real topic: every field lands where the materialized view puts it, and a retried batch's copies collapse."""

import re
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.harness.clients import send
from tests.harness.kafka import read_topic, running_broker

chdb_session = pytest.importorskip(
    "chdb.session", reason="chDB is not installed (pip install -r requirements-dev.txt installs chdb-core)"
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "kafka.md"
TOPIC = "analytics-events"
# The queue table's engine clause: chDB cannot run the Kafka engine, so the test swaps it for Null, on which a
# materialized view fires for every insert as it does for every block the Kafka engine reads.
KAFKA_ENGINE = re.compile(r"ENGINE = Kafka\s+SETTINGS[^;]*")


def doc_statements() -> list[str]:
    """The SQL statements of docs/kafka.md's sql blocks, in order."""
    blocks = re.findall(r"```sql\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    return [statement.strip() for block in blocks for statement in block.split(";") if statement.strip()]


def clickhouse_time(value: str | None) -> str | None:
    """An RFC 3339 UTC time of the line as ClickHouse writes a DateTime64(6) in JSON."""
    if value is None:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).strftime("%Y-%m-%d %H:%M:%S.%f")


def expected_row(line: bytes) -> dict[str, Any]:
    """The row the materialized view must make of one line."""
    event = orjson.loads(line)
    return {
        "event_key": event.get("id") or None,
        "id": event.get("id", ""),
        "type": event["type"],
        "user_id": event.get("userId") or "",
        "session_id": event.get("sessionId") or "",
        "timestamp": clickhouse_time(event.get("timestamp")),
        "batch_timestamp": clickhouse_time(event.get("batch_timestamp")),
        "received_at": clickhouse_time(event["received_at"]),
        "request_id": event["request_id"],
        "client_ip": event.get("client_ip", ""),
        "payload": orjson.dumps(event["payload"]).decode() if "payload" in event else "",
    }


def test_the_documented_tables_load_real_records(start_server, tmp_path):
    """The queue table, the events table and the view from docs/kafka.md, fed the topic's records as the Kafka
    engine reads them (JSONAsString): one row per event with every field in its column, the payload as JSON
    text, events without an id kept apart by the line's hash; a batch sent twice adds no row under FINAL."""
    statements = doc_statements()
    assert [statement.split("\n")[0] for statement in statements] == [
        "CREATE TABLE analytics_events_queue",
        "CREATE TABLE analytics_events",
        "CREATE MATERIALIZED VIEW analytics_events_mv TO analytics_events AS",
    ]
    assert KAFKA_ENGINE.search(statements[0])

    with running_broker(tmp_path) as broker:
        env = {"ANALYTICS_SINKS": "kafka", "ANALYTICS_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap}
        server = start_server(workers=1, env=env)
        retried = {
            "timestamp": "2026-05-20T14:32:00.5Z",
            "events": [
                {
                    "type": "purchase",
                    "id": "ch-1",
                    "userId": "user-1",
                    "sessionId": "session-1",
                    "timestamp": "2026-05-20T14:31:59.123456Z",
                    "payload": {"plan": "pro", "items": [1, 2.5, {"name": "é \U0001f600", "ok": True}], "none": None},
                },
                {"type": "page_view", "id": "ch-2", "sessionId": "session-2", "payload": {}},
            ],
        }
        once = {"events": [{"type": "anonymous"}, {"type": "anonymous", "payload": {"n": 1}}]}
        for body in (retried, retried, once):
            status, _, answer = send(server.port, orjson.dumps(body))
            assert (status, answer) == (200, {"success": True, "received": len(body["events"])})
        lines = [record.value for record in read_topic(broker.bootstrap, TOPIC)]
    assert len(lines) == 6

    session = chdb_session.Session(str(tmp_path / "chdb"))
    for statement in statements:
        session.query(KAFKA_ENGINE.sub("ENGINE = Null", statement))
    session.query("INSERT INTO analytics_events_queue FORMAT JSONAsString\n" + b"\n".join(lines).decode())
    result = session.query("SELECT * FROM analytics_events FINAL ORDER BY type, event_key", "JSONEachRow")
    rows = [orjson.loads(line) for line in result.bytes().splitlines()]

    expected = {}
    for line in lines:
        row = expected_row(line)
        if row["event_key"] is None:
            # The view keys an event without an id by the line's hash, ClickHouse's cityHash64.
            hashed = session.query("SELECT hex(cityHash64({line:String}))", "CSV", params={"line": line.decode()})
            row["event_key"] = hashed.bytes().decode().strip().strip('"')
        # Of a retried event's copies, the last inserted stays (ReplacingMergeTree without a version column).
        expected[(row["type"], row["event_key"])] = row
    assert rows == [expected[key] for key in sorted(expected)]
    assert len(rows) == 4
    assert {row["id"] for row in rows} == {"ch-1", "ch-2", ""}
    assert len({row["event_key"] for row in rows if row["id"] == ""}) == 2
