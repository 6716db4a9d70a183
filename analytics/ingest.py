"""Checking a parsed batch and writing its valid events: all between the body and the answer."""

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import structlog
from marshmallow import ValidationError

from analytics import messages
from analytics.enrich import Enricher
from analytics.errors import ApiError
from analytics.eventlog import EventLog, SinkUnavailableError, event_logger
from analytics.fastload import compile_batch_loader, compile_loader
from analytics.metrics import Metrics, events_dropped
from analytics.peers import Sender
from analytics.plan import TrackingPlan
from analytics.redact import redactor_from_settings
from analytics.schemas import MAX_ID_LENGTH, BatchSchema, EventSchema, size_error
from analytics.stdout import LogWriteError

log = structlog.get_logger()

# Seconds a client is asked to wait before retrying a batch the event store could not take; as nginx's own 503.
RETRY_AFTER = 5

# Unknown fields of one event that its entry in `rejected` names, at most (the first sent). marshmallow explains
# every field it is handed, a few µs each: 1000 events of 120 unknown fields cost eleven valid batches and
# answered 3 MB; an event with one unknown field is as invalid as one with a hundred.
MAX_UNKNOWN_NAMED = 10

BATCH_SCHEMA = BatchSchema()
FAST_LOAD_BATCH = compile_loader(BATCH_SCHEMA)


def load_batch(body: Any) -> tuple[list[Any], datetime | None]:
    """The batch's raw events and its timestamp, or the 400 that says what is wrong."""
    batch = FAST_LOAD_BATCH(body)
    if batch is None:
        try:
            batch = BATCH_SCHEMA.load(body)
        except ValidationError as error:
            # marshmallow raises it from a frame that holds it: a reference cycle which, with the
            # body in it, would outlive the request until the collector next runs. Cut here.
            error.__traceback__ = None
            if set(error.messages) == {"timestamp"}:
                raise ApiError(400, messages.INVALID_TIMESTAMP) from error
            raise ApiError(400, messages.INVALID_EVENTS) from error
    return batch["events"], batch.get("timestamp")


# Bodies from this size on are ingested with the collector paused. A smaller one holds too few
# containers (at most 11,000 or so) to set off the collector's full collections, and pausing
# costs a collection of the young objects once the pause ends: about 30 µs a request, a tenth
# of a small request's cost, measured with and without.
PAUSE_FROM_BYTES = 32 * 1024


class _CollectorPause:
    """Python's cycle collector held off while a large body is being ingested.

    Parsed JSON holds no reference cycles: reference counting frees all of it.
    But every container it creates counts towards the collector's thresholds,
    and a body of tiny containers (1 MiB of nested empty arrays is 350,000
    lists, from 2 KB of gzip) had the collector traverse them again and again
    while they were being created: 250 ms of CPU for one request. Paused, such
    a body costs its parse. Threads (gthread workers) share the one collector,
    so it resumes only when no request holds it, and only if it was running.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._was_enabled = False

    @contextmanager
    def __call__(self, body_bytes: int) -> Iterator[None]:
        """Pause for the block if the body is ``body_bytes`` long, from PAUSE_FROM_BYTES on."""
        if body_bytes < PAUSE_FROM_BYTES:
            yield
            return
        with self._lock:
            if self._holders == 0:
                self._was_enabled = gc.isenabled()
                gc.disable()
            self._holders += 1
        try:
            yield
        finally:
            with self._lock:
                self._holders -= 1
                if self._holders == 0 and self._was_enabled:
                    gc.enable()


collector_paused = _CollectorPause()


def _rejection(index: int, raw: Any, errors: Any, key: str = "errors") -> dict[str, Any]:
    """One entry of the ``rejected`` list (or, with ``key`` plan_violations, of ``flagged``), with the client's id so
    it can match its own event."""
    entry: dict[str, Any] = {"index": index}
    event_id = raw.get("id") if isinstance(raw, dict) else None
    if isinstance(event_id, str) and len(event_id) <= MAX_ID_LENGTH:
        entry["id"] = event_id
    entry[key] = errors
    return entry


class Ingestor:
    """The settings-bound checker and writer, one per app."""

    def __init__(
        self,
        config: dict[str, Any],
        event_log: EventLog,
        metrics: Metrics | None = None,
        plan: TrackingPlan | None = None,
    ) -> None:
        self.max_events = config["MAX_EVENTS"]
        self.schema = EventSchema(max_bytes=config["MAX_EVENT_BYTES"])
        self.fast_load = compile_loader(self.schema, hooks={"within_size": self.schema.fits})
        self.fast_load_all = compile_batch_loader(self.schema, hooks={"within_size": self.schema.all_fit})
        self.known_fields = frozenset(self.schema.load_fields)
        self.redactor = redactor_from_settings(config)
        self.event_log = event_log
        self._lines = event_logger(event_log)
        # None when METRICS is off: then nothing is counted.
        self.metrics = metrics
        # None without a plan or in mode off: then no event is looked at for it.
        self.plan = plan if plan is not None and plan.enforced else None
        # The fields added to every line, and the requests answered but not written (bots, EXCLUDE_IPS).
        self.enricher = Enricher(config, count_dropped=events_dropped if metrics else None)

    def ingest(self, body: Any, received_at: datetime, sender: Sender) -> dict[str, Any]:
        """Check a parsed body, write its valid events, and say what became of each: the answer's body."""
        events, batch_timestamp = load_batch(body)
        accepted, rejected, flagged = self.check(events)
        context = self.line_context(sender, received_at, batch_timestamp)
        # A request whose events are dropped is answered as if they were written: the client is not told.
        if self.enricher.enrich(accepted, context, sender, received_at, batch_timestamp):
            self.write(accepted, context)
            if self.metrics:
                self.metrics.accepted(len(accepted))
        answer: dict[str, Any] = {"success": True, "received": len(accepted)}
        if rejected:
            answer["rejected"] = rejected
        if flagged:
            answer["flagged"] = flagged
        return answer

    def line_context(self, sender: Sender, received_at: datetime, batch_timestamp: datetime | None) -> dict[str, Any]:
        """What every event line of the request carries besides its event and its enrichment, in the order written;
        absent is left off."""
        context: dict[str, Any] = {}
        if batch_timestamp is not None:
            context["batch_timestamp"] = batch_timestamp
        context["received_at"] = received_at
        context["request_id"] = sender.request_id
        return context

    def check(self, events: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        """Split the batch into loaded valid events, redacted, and the rejections of the others; and say which
        accepted events the tracking plan flags (each also carries its ``plan_violations`` to its line).

        A batch too long is a 413, and one with nothing valid but something invalid a 400. A batch checked at
        once is loaded in place (its dicts get their parsed timestamps), so a list is checked once only.
        """
        if len(events) > self.max_events:
            raise ApiError(413, messages.TOO_MANY_EVENTS, limit_events=self.max_events)
        rejected: list[dict[str, Any]] = []
        loaded_all = self.fast_load_all(events)
        if loaded_all is not None:
            accepted = list(zip(range(len(events)), events, loaded_all, strict=True))
        else:
            accepted = self._loaded_one_by_one(events, rejected)
        # The plan sees payloads as sent, before redaction; its messages never hold a value.
        flags = self._within_plan(accepted, rejected) if self.plan is not None else None
        if self.redactor and self.redactor.for_request()(loaded.get("payload") for _, _, loaded in accepted):
            accepted = self._within_size_once_redacted(accepted, rejected)
        if self.metrics:
            self.metrics.checked(events, rejected)
        if rejected and not accepted:
            raise ApiError(400, messages.INVALID_EVENTS, rejected=rejected)
        flagged = []
        if flags:
            for index, raw, loaded in accepted:
                violations = flags.get(index)
                if violations:
                    loaded["plan_violations"] = violations
                    flagged.append(_rejection(index, raw, violations, key="plan_violations"))
        return [loaded for _, _, loaded in accepted], rejected, flagged

    def _loaded_one_by_one(
        self, events: list[Any], rejected: list[dict[str, Any]]
    ) -> list[tuple[int, Any, dict[str, Any]]]:
        """Each event loaded on its own (the fast loader, or marshmallow, which explains): those valid, as (index,
        event as sent, loaded); the rejections of the others go to ``rejected``."""
        accepted = []
        for index, raw in enumerate(events):
            loaded = self.fast_load(raw)
            if loaded is None:
                try:
                    loaded = self.schema.load(self._few_unknown(raw))
                except ValidationError as error:
                    error.__traceback__ = None  # the cycle, as in load_batch
                    rejected.append(_rejection(index, raw, error.messages))
                    continue
            accepted.append((index, raw, loaded))
        return accepted

    def _few_unknown(self, raw: Any) -> Any:
        """``raw``, or, for an event with more than MAX_UNKNOWN_NAMED unknown fields, a copy without the unknown
        fields after the first MAX_UNKNOWN_NAMED sent: invalid all the same, and explained by those."""
        if (
            type(raw) is not dict
            or len(raw) <= MAX_UNKNOWN_NAMED
            or len(raw.keys() - self.known_fields) <= MAX_UNKNOWN_NAMED
        ):
            return raw
        named = 0
        few = {}
        for key, value in raw.items():
            if key not in self.known_fields:
                if named == MAX_UNKNOWN_NAMED:
                    continue
                named += 1
            few[key] = value
        return few

    def _within_plan(
        self, accepted: list[tuple[int, Any, dict[str, Any]]], rejected: list[dict[str, Any]]
    ) -> dict[int, list[dict[str, str]]]:
        """Move the events the tracking plan rejects from ``accepted`` to ``rejected``; the violations of those it
        flags, by index (put on their lines once redaction and the size check are done)."""
        flags = {}
        kept = []
        plan_verdict = self.plan.for_request()
        for entry in accepted:
            verdict = plan_verdict(entry[2])
            if verdict is None:
                kept.append(entry)
            elif verdict.rejects:
                rejected.append(_rejection(entry[0], entry[1], verdict.errors()))
            else:
                flags[entry[0]] = verdict.violations
                kept.append(entry)
        if len(kept) < len(accepted):
            accepted[:] = kept
            rejected.sort(key=lambda entry: entry["index"])
        return flags

    def _within_size_once_redacted(
        self, accepted: list[tuple[int, Any, dict[str, Any]]], rejected: list[dict[str, Any]]
    ) -> list[tuple[int, Any, dict[str, Any]]]:
        """The events still within MAX_EVENT_BYTES now that their payloads are redacted; the others go to ``rejected``.

        "[REDACTED]" can be longer than what it replaces (11 bytes more than a 0), and the
        limit applies to what is written. Measured only for batches where something was redacted.
        """
        kept = []
        for index, raw, loaded in accepted:
            error = size_error(loaded, self.schema.max_bytes)
            if error:
                rejected.append(_rejection(index, raw, {"_schema": [error]}))
            else:
                kept.append((index, raw, loaded))
        rejected.sort(key=lambda entry: entry["index"])
        return kept

    def write(self, events: list[dict[str, Any]], context: dict[str, Any]) -> None:
        """Write the (checked, redacted) events, one line each with ``context``; a 500 if stdout fails, a 503
        (retry) if the event store cannot take them now."""
        if not events:
            return
        # None means absent: such fields are left off the line.
        lines = [
            event if None not in event.values() else {key: value for key, value in event.items() if value is not None}
            for event in events
        ]
        try:
            self._lines.info(events=lines, **context)
        except LogWriteError as error:
            log.error("event_log_write_failed", error=str(error), events=len(lines))
            raise ApiError(500, messages.LOG_WRITE_FAILED) from error
        except SinkUnavailableError as error:
            log.warning("event_store_unavailable", reason=str(error), events=len(lines))
            raise ApiError(503, messages.EVENT_STORE_UNAVAILABLE, headers={"Retry-After": str(RETRY_AFTER)}) from error
