"""Checking a parsed batch and writing its valid events: all between the body and the answer."""

from datetime import datetime
from typing import Any

import structlog
from marshmallow import ValidationError

from analytics.errors import ApiError
from analytics.eventlog import EventLog
from analytics.fastload import compile_loader
from analytics.redact import redact, redacted_key_set
from analytics.schemas import MAX_ID_LENGTH, BatchSchema, EventSchema
from analytics.stdout import LogWriteError

log = structlog.get_logger()

BATCH_SCHEMA = BatchSchema()
FAST_LOAD_BATCH = compile_loader(BATCH_SCHEMA)


def load_batch(body: Any) -> tuple[list[Any], datetime | None]:
    """The batch's raw events and its timestamp, or the 400 that says what is wrong."""
    batch = FAST_LOAD_BATCH(body)
    if batch is None:
        try:
            batch = BATCH_SCHEMA.load(body)
        except ValidationError as error:
            if set(error.messages) == {"timestamp"}:
                raise ApiError(400, "Invalid timestamp") from error
            raise ApiError(400, "Invalid events") from error
    return batch["events"], batch.get("timestamp")


def _rejection(index: int, raw: Any, errors: Any) -> dict[str, Any]:
    """One entry of the ``rejected`` list, with the client's id so it can match its own event."""
    entry: dict[str, Any] = {"index": index}
    event_id = raw.get("id") if isinstance(raw, dict) else None
    if isinstance(event_id, str) and len(event_id) <= MAX_ID_LENGTH:
        entry["id"] = event_id
    entry["errors"] = errors
    return entry


class Ingestor:
    """The settings-bound checker and writer, one per app."""

    def __init__(self, config: dict[str, Any], event_log: EventLog) -> None:
        self.max_events = config["MAX_EVENTS"]
        self.schema = EventSchema(max_bytes=config["MAX_EVENT_BYTES"])
        self.fast_load = compile_loader(self.schema, whole=self.schema.fits)
        self.redact_keys = redacted_key_set(config["REDACT_KEYS"])
        self.event_log = event_log

    def check(self, events: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Split the batch into loaded valid events and the rejections of the others.

        A batch too long is a 413, and one with nothing valid but something invalid a 400.
        """
        if len(events) > self.max_events:
            raise ApiError(413, "Too many events", limit_events=self.max_events)
        accepted, rejected = [], []
        for index, raw in enumerate(events):
            loaded = self.fast_load(raw)
            if loaded is None:
                try:
                    loaded = self.schema.load(raw)
                except ValidationError as error:
                    rejected.append(_rejection(index, raw, error.messages))
                    continue
            accepted.append(loaded)
        if rejected and not accepted:
            raise ApiError(400, "Invalid events", rejected=rejected)
        return accepted, rejected

    def write(self, events: list[dict[str, Any]], **context: Any) -> None:
        """Redact and write the events, one line each with ``context``; a 500 if the log fails."""
        if not events:
            return
        lines = []
        for event in events:
            if None in event.values():
                # None means absent: such fields are left off the line.
                event = {key: value for key, value in event.items() if value is not None}
            if "payload" in event:
                redact(event["payload"], self.redact_keys)
            lines.append(event)
        try:
            self.event_log.write(lines, **{key: value for key, value in context.items() if value is not None})
        except LogWriteError as error:
            log.error("event_log_write_failed", error=str(error), events=len(lines))
            raise ApiError(500, "Failed to process events") from error
