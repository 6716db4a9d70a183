"""The tracking plan (TRACKING_PLAN and its modes) through the Flask test client: the answers and the lines written."""

import json
import re
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from analytics.lines import CONTEXT_ALLOWANCE, encode
from analytics.plan import FIRST_ONLY, MAX_VIOLATIONS_BYTES, MORE, UNPLANNED_MESSAGE
from app import create_app
from bench.payloads import make_body
from config import Config, SettingsError
from tests.harness.costs import WORST_OVER_VALID, cpu_over_valid
from tests.harness.lines import parse_lines, strict_json
from tests.harness.openapi import assert_matches

ROOT = Path(__file__).parent.parent
EXAMPLE_PLAN = ROOT / "plans" / "example.json"

PURCHASE = {
    "type": "object",
    "properties": {
        "amount": {"type": "number", "minimum": 0},
        "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
        "items": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1}},
                "required": ["sku"],
                "additionalProperties": False,
            },
        },
        "customer": {
            "type": "object",
            "properties": {
                "email": {"type": "string", "format": "email"},
                "address": {"type": "object", "properties": {"zip": {"type": "string", "maxLength": 10}}},
            },
        },
        "placed_at": {"type": "string", "format": "date-time"},
        "password": {"type": "string", "minLength": 8},
    },
    "required": ["amount", "items"],
    "additionalProperties": False,
}
PLAN = {"purchase": PURCHASE, "page_view": {"type": "object", "properties": {"url": {"type": "string"}}}}
VALID = {"amount": 19.5, "items": [{"sku": "BOOK-42", "quantity": 1}]}

# A payload of `purchase` and the violations the plan finds in it, in the validator's order.
PAYLOADS = [
    pytest.param(VALID, [], id="valid"),
    pytest.param(
        {**VALID, "currency": "EUR", "customer": {"email": "a@b.example", "address": {"zip": "75001"}}},
        [],
        id="valid-nested",
    ),
    pytest.param({"items": VALID["items"]}, [("/payload/amount", "Missing data for required field.")], id="required"),
    pytest.param({**VALID, "amount": "19.5"}, [("/payload/amount", "Not a valid number.")], id="type"),
    pytest.param({**VALID, "amount": -1}, [("/payload/amount", "Must be greater than or equal to 0.")], id="minimum"),
    pytest.param(
        {**VALID, "currency": "euro"},
        [("/payload/currency", 'String does not match expected pattern "^[A-Z]{3}$".')],
        id="pattern",
    ),
    pytest.param(
        {**VALID, "items": [{"quantity": 2}]},
        [("/payload/items/0/sku", "Missing data for required field.")],
        id="array",
    ),
    pytest.param(
        {**VALID, "items": [{"sku": "A"}, {"sku": "B", "quantity": 0, "colour": "red"}]},
        [
            ("/payload/items/1/quantity", "Must be greater than or equal to 1."),
            ("/payload/items/1/colour", "Unknown field."),
        ],
        id="array-nested",
    ),
    pytest.param({**VALID, "items": []}, [("/payload/items", "Fewer items than the minimum of 1.")], id="min-items"),
    pytest.param(
        {**VALID, "customer": {"email": "not an address"}},
        [("/payload/customer/email", "Not a valid email.")],
        id="format-email",
    ),
    pytest.param(
        {**VALID, "placed_at": "yesterday"}, [("/payload/placed_at", "Not a valid date-time.")], id="format-date-time"
    ),
    pytest.param(
        {**VALID, "customer": {"address": {"zip": "0123456789012"}}},
        [("/payload/customer/address/zip", "Longer than maximum length 10.")],
        id="nested-deep",
    ),
    pytest.param({**VALID, "coupon": "X"}, [("/payload/coupon", "Unknown field.")], id="additional-properties"),
    pytest.param({**VALID, "a/b~c": 1}, [("/payload/a~1b~0c", "Unknown field.")], id="pointer-escaped"),
    pytest.param(
        None,
        [
            ("/payload/amount", "Missing data for required field."),
            ("/payload/items", "Missing data for required field."),
        ],
        id="no-payload",
    ),
    pytest.param(
        {**VALID, "password": "hunter2"}, [("/payload/password", "Shorter than minimum length 8.")], id="secret"
    ),
]


def violations(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    """Violations as the line and the answer hold them."""
    return [{"path": path, "message": message} for path, message in pairs]


def plan_app(tmp_path: Path, plan: Any = PLAN, **settings: Any) -> Flask:
    """The app with ``plan`` written to a file as TRACKING_PLAN, and these settings."""
    path = tmp_path / "plan.json"
    path.write_text(plan if isinstance(plan, str) else json.dumps(plan))
    return create_app({"TESTING": True, "TRACKING_PLAN": str(path), **settings})


def send(app: Flask, capfd: pytest.CaptureFixture[str], events: list[Any]) -> tuple[int, Any, list[dict]]:
    """POST a batch of ``events``: the status, the answer's JSON and the event lines written."""
    capfd.readouterr()
    response = app.test_client().post("/api/analytics", data=json.dumps({"events": events}))
    lines = parse_lines(capfd.readouterr().out.encode())
    return response.status_code, response.json, lines


def purchase(payload: Any, event_id: str = "e1") -> dict[str, Any]:
    """A `purchase` event with this payload (None: none)."""
    event: dict[str, Any] = {"type": "purchase", "id": event_id}
    if payload is not None:
        event["payload"] = payload
    return event


# --- the modes, per payload ---------------------------------------------------------------------


@pytest.mark.parametrize(("payload", "expected"), PAYLOADS)
def test_flag_writes_the_event_with_its_violations(tmp_path, capfd, payload, expected):
    """flag: the event is written; a violating one carries plan_violations on its line and in `flagged`."""
    status, answer, lines = send(plan_app(tmp_path, TRACKING_PLAN_MODE="flag"), capfd, [purchase(payload)])
    assert status == 200
    assert len(lines) == 1
    if expected:
        assert answer == {
            "success": True,
            "received": 1,
            "flagged": [{"index": 0, "id": "e1", "plan_violations": violations(expected)}],
        }
        assert lines[0]["plan_violations"] == violations(expected)
    else:
        assert answer == {"success": True, "received": 1}
        assert "plan_violations" not in lines[0]


@pytest.mark.parametrize(("payload", "expected"), PAYLOADS)
def test_reject_refuses_the_violating_event(tmp_path, capfd, payload, expected):
    """reject: a violating event is in `rejected`, its errors the same messages by path, and nothing is written."""
    status, answer, lines = send(plan_app(tmp_path, TRACKING_PLAN_MODE="reject"), capfd, [purchase(payload)])
    if expected:
        errors: dict[str, list[str]] = {}
        for path, message in expected:
            errors.setdefault(path, []).append(message)
        assert (status, answer) == (
            400,
            {"error": "Invalid events", "rejected": [{"index": 0, "id": "e1", "errors": errors}]},
        )
        assert lines == []
    else:
        assert (status, answer) == (200, {"success": True, "received": 1})
        assert len(lines) == 1 and "plan_violations" not in lines[0]


@pytest.mark.parametrize(("payload", "expected"), PAYLOADS)
def test_off_serves_the_plan_and_checks_nothing(tmp_path, capfd, payload, expected):
    """off: the plan is read (and served), and every event is written as without one."""
    app = plan_app(tmp_path, TRACKING_PLAN_MODE="off", TRACKING_PLAN_UNPLANNED="reject")
    status, answer, lines = send(app, capfd, [purchase(payload), {"type": "unplanned"}])
    assert (status, answer) == (200, {"success": True, "received": 2})
    assert [line["type"] for line in lines] == ["purchase", "unplanned"]
    assert not any("plan_violations" in line for line in lines)
    assert app.test_client().get("/api/tracking-plan").json["mode"] == "off"


# --- unplanned types ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["flag", "reject"])
@pytest.mark.parametrize("unplanned", ["allow", "flag", "reject"])
def test_unplanned_types(tmp_path, capfd, mode, unplanned):
    """TRACKING_PLAN_UNPLANNED decides for a type the plan does not list, whatever the mode does to the others."""
    app = plan_app(tmp_path, TRACKING_PLAN_MODE=mode, TRACKING_PLAN_UNPLANNED=unplanned)
    status, answer, lines = send(app, capfd, [purchase(VALID), {"type": "purchase_v2", "id": "e2"}])
    assert status == 200
    unplanned_violation = [{"path": "/type", "message": UNPLANNED_MESSAGE}]
    if unplanned == "allow":
        assert answer == {"success": True, "received": 2}
        assert [line.get("plan_violations") for line in lines] == [None, None]
    elif unplanned == "flag":
        assert answer == {
            "success": True,
            "received": 2,
            "flagged": [{"index": 1, "id": "e2", "plan_violations": unplanned_violation}],
        }
        assert [line.get("plan_violations") for line in lines] == [None, unplanned_violation]
    else:
        assert answer == {
            "success": True,
            "received": 1,
            "rejected": [{"index": 1, "id": "e2", "errors": {"/type": [UNPLANNED_MESSAGE]}}],
        }
        assert [line["type"] for line in lines] == ["purchase"]


# --- a batch of every kind ----------------------------------------------------------------------

MIXED = [
    purchase(VALID, "valid"),
    purchase({"items": []}, "violating"),
    {"type": "purchase", "id": "malformed", "payload": VALID, "extra": 1},
    "not an event",
    {"type": "unplanned", "id": "unplanned"},
    {"type": "page_view", "id": "view", "payload": {"url": "/"}},
    purchase({**VALID, "amount": "0"}, "violating-2"),
]
MALFORMED = [
    {"index": 2, "id": "malformed", "errors": {"extra": ["Unknown field."]}},
    {"index": 3, "errors": {"_schema": ["Invalid input type."]}},
]
VIOLATING = [
    (
        1,
        "violating",
        [
            ("/payload/amount", "Missing data for required field."),
            ("/payload/items", "Fewer items than the minimum of 1."),
        ],
    ),
    (6, "violating-2", [("/payload/amount", "Not a valid number.")]),
]


def test_mixed_batch_flag(tmp_path, capfd):
    """flag: every valid event is written in order, the violating and unplanned ones marked; the malformed rejected."""
    status, answer, lines = send(plan_app(tmp_path, TRACKING_PLAN_MODE="flag"), capfd, MIXED)
    unplanned = (4, "unplanned", [("/type", UNPLANNED_MESSAGE)])
    flagged = sorted([*VIOLATING, unplanned])
    assert (status, answer) == (
        200,
        {
            "success": True,
            "received": 5,
            "rejected": MALFORMED,
            "flagged": [{"index": i, "id": id_, "plan_violations": violations(v)} for i, id_, v in flagged],
        },
    )
    assert [(line["id"], line.get("plan_violations")) for line in lines] == [
        ("valid", None),
        ("violating", violations(VIOLATING[0][2])),
        ("unplanned", [{"path": "/type", "message": UNPLANNED_MESSAGE}]),
        ("view", None),
        ("violating-2", violations(VIOLATING[1][2])),
    ]


def test_mixed_batch_reject(tmp_path, capfd):
    """reject: the violating and unplanned events join the malformed ones in `rejected`, in index order."""
    app = plan_app(tmp_path, TRACKING_PLAN_MODE="reject", TRACKING_PLAN_UNPLANNED="reject")
    status, answer, lines = send(app, capfd, MIXED)
    by_path = {}
    for index, event_id, pairs in VIOLATING:
        errors: dict[str, list[str]] = {}
        for path, message in pairs:
            errors.setdefault(path, []).append(message)
        by_path[index] = {"index": index, "id": event_id, "errors": errors}
    by_path[4] = {"index": 4, "id": "unplanned", "errors": {"/type": [UNPLANNED_MESSAGE]}}
    rejected = sorted([*MALFORMED, *by_path.values()], key=lambda entry: entry["index"])
    assert (status, answer) == (200, {"success": True, "received": 2, "rejected": rejected})
    assert [line["id"] for line in lines] == ["valid", "view"]


# --- secrets and bounds -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["flag", "reject"])
def test_payload_is_checked_as_sent_and_no_value_comes_back(tmp_path, capfd, mode):
    """The plan sees the password as sent (valid: long enough), the line has it redacted, and a violation
    elsewhere in the payload never repeats a value, secret or not."""
    plan = {
        "login": {
            "type": "object",
            "properties": {"password": {"type": "string", "minLength": 8}, "n": {"type": "integer"}},
            "required": ["password"],
        }
    }
    secret = "correct horse battery staple"
    events = [
        {"type": "login", "payload": {"password": secret}},
        {"type": "login", "payload": {"password": secret, "n": "value-of-n"}},
    ]
    app = plan_app(tmp_path, plan, TRACKING_PLAN_MODE=mode)
    capfd.readouterr()
    response = app.test_client().post("/api/analytics", data=json.dumps({"events": events}))
    out = capfd.readouterr().out
    assert secret not in out and secret not in response.text
    assert "value-of-n" not in response.text
    lines = parse_lines(out.encode())
    assert lines[0]["payload"] == {"password": "[REDACTED]"}
    expected = [{"path": "/payload/n", "message": "Not a valid integer."}]
    if mode == "flag":
        assert response.json["flagged"] == [{"index": 1, "plan_violations": expected}]
        assert lines[1]["plan_violations"] == expected
    else:
        assert response.json["rejected"] == [{"index": 1, "errors": {"/payload/n": ["Not a valid integer."]}}]
        assert len(lines) == 1


def test_violations_are_bounded_on_the_line_and_in_the_answer(tmp_path, capfd):
    """Many violations, long keys full of characters JSON escapes: each line stays within its allowance, and each
    `flagged` entry within the same bound, however the payload is made. A small payload gets its first ten
    violations listed and a word that there are more; a large one those of its first error, and a word saying so."""
    max_event_bytes = 9000
    plan = {"strict": {"type": "object", "additionalProperties": False, "propertyNames": {"maxLength": 4}}}
    long_keys = {"\x01" * 200 + str(i): 0 for i in range(6)}
    many_keys = {f"k{i}": 0 for i in range(500)}
    fifteen_keys = {f"k{i}": 0 for i in range(15)}
    events = [
        {"type": "strict", "id": "\x02" * 128, "payload": long_keys},
        {"type": "strict", "id": "many", "payload": many_keys},
        {"type": "strict", "id": "fifteen", "payload": fifteen_keys},
    ]
    app = plan_app(tmp_path, plan, TRACKING_PLAN_MODE="flag", MAX_EVENT_BYTES=max_event_bytes)
    status, answer, lines = send(app, capfd, events)
    assert status == 200 and answer["received"] == 3
    for line, entry in zip(lines, answer["flagged"], strict=True):
        assert len(encode(line)) <= max_event_bytes + CONTEXT_ALLOWANCE
        assert len(encode(line["plan_violations"])) <= MAX_VIOLATIONS_BYTES
        assert entry["plan_violations"] == line["plan_violations"]
        assert len(encode(entry)) <= MAX_VIOLATIONS_BYTES + 6 * 128 + 64
    first, many, fifteen = (line["plan_violations"] for line in lines)
    # Each path is cut (with an ellipsis) rather than repeating a 200-character key.
    assert len(first) == 2 and len(first[0]["path"]) == 128 and first[0]["path"].endswith("…")
    # The first error of the second is `additionalProperties: false`, which every key breaks: ten are listed.
    assert first[1] == many[-1] == FIRST_ONLY
    assert many[:-1] == [{"path": f"/payload/k{i}", "message": "Unknown field."} for i in range(10)]
    assert fifteen == [*({"path": f"/payload/k{i}", "message": "Unknown field."} for i in range(10)), MORE]


# --- GET /api/tracking-plan ---------------------------------------------------------------------


def test_tracking_plan_is_served(tmp_path):
    """The plan in force, as the file has it, with its modes."""
    app = plan_app(tmp_path, TRACKING_PLAN_MODE="reject", TRACKING_PLAN_UNPLANNED="allow")
    response = app.test_client().get("/api/tracking-plan")
    assert (response.status_code, response.content_type) == (200, "application/json")
    assert response.json == {"mode": "reject", "unplanned": "allow", "types": PLAN}


def test_no_plan_is_served_as_an_empty_one():
    """Without TRACKING_PLAN: no types, nothing checked."""
    response = create_app({"TESTING": True}).test_client().get("/api/tracking-plan")
    assert (response.status_code, response.json) == (200, {"mode": "off", "unplanned": "allow", "types": {}})


def test_a_plan_file_without_a_mode_flags(tmp_path):
    """TRACKING_PLAN_MODE unset: flag with a plan (off without one, above)."""
    assert plan_app(tmp_path).test_client().get("/api/tracking-plan").json["mode"] == "flag"


@pytest.mark.parametrize(("mode", "unplanned"), [("flag", "flag"), ("reject", "reject")])
def test_answers_are_those_the_document_states(tmp_path, capfd, mode, unplanned):
    """`flagged`, plan rejections (200 and 400) and the served plan match the OpenAPI document."""
    app = plan_app(tmp_path, TRACKING_PLAN_MODE=mode, TRACKING_PLAN_UNPLANNED=unplanned)
    client = app.test_client()
    doc = strict_json(client.get("/api/openapi.json").data)
    for events in (MIXED, [purchase({"items": []}), {"type": "unplanned"}]):
        response = client.post("/api/analytics", data=json.dumps({"events": events}))
        assert response.status_code == (400 if mode == "reject" and events is not MIXED else 200)
        assert_matches(doc, "/api/analytics", "POST", response)
    assert_matches(doc, "/api/tracking-plan", "GET", client.get("/api/tracking-plan"))
    capfd.readouterr()


# --- the example plan ---------------------------------------------------------------------------

# What /demo's buttons, analytics.js's data-page-view and the README's example send.
EXAMPLE_EVENTS = [
    {
        "type": "page_view",
        "payload": {"url": "http://localhost:8000/demo", "referrer": "", "title": "analytics.js demo"},
    },
    {"type": "signup_click", "payload": {"plan": "pro"}},
    {"type": "add_to_cart", "payload": {"sku": "BOOK-42", "price": 19.5}},
    {"type": "search_query", "payload": {"query": "rate limiting"}},
    {"type": "article_read", "payload": {"slug": "nextjs-api-routes", "duration_ms": 4500}},
    {"type": "bookmark_added", "payload": {"article_id": "art_8832"}},
]


def test_example_plan_takes_what_the_demo_and_readme_send(capfd):
    """plans/example.json in reject mode accepts every event the demo page, the client and the README send."""
    app = create_app({"TESTING": True, "TRACKING_PLAN": str(EXAMPLE_PLAN), "TRACKING_PLAN_MODE": "reject"})
    status, answer, lines = send(app, capfd, EXAMPLE_EVENTS)
    assert (status, answer) == (200, {"success": True, "received": len(EXAMPLE_EVENTS)})
    assert sorted(json.loads(EXAMPLE_PLAN.read_text())) == sorted(event["type"] for event in EXAMPLE_EVENTS)
    # The events above are those the sources send: the same types and payload keys.
    sources = "".join(
        (ROOT / path).read_text()
        for path in ("analytics/templates/demo.html", "analytics/static/analytics.js", "README.md")
    )
    for event in EXAMPLE_EVENTS:
        assert f"'{event['type']}'" in sources or f'"type": "{event["type"]}"' in sources
        for key in event["payload"]:
            assert re.search(rf"\b{key}\b", sources), key


def test_example_plan_refuses_a_mistake(capfd):
    """A typo'd field and a string price are refused, each named."""
    app = create_app({"TESTING": True, "TRACKING_PLAN": str(EXAMPLE_PLAN), "TRACKING_PLAN_MODE": "reject"})
    status, answer, _ = send(app, capfd, [{"type": "add_to_cart", "payload": {"sku": "BOOK-42", "prize": "19.5"}}])
    assert (status, answer["rejected"][0]["errors"]) == (
        400,
        {"/payload/price": ["Missing data for required field."], "/payload/prize": ["Unknown field."]},
    )


# --- settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", r"TRACKING_PLAN: '.*plan\.json' is not JSON: "),
        ("[]", "must be a JSON object mapping event types to schemas"),
        ("{}", "must be a JSON object mapping event types to schemas"),
        ('{"purchase": 3}', "type 'purchase': its schema must be a JSON object or a boolean, not int"),
        ('{"purchase": {"type": "nope"}}', r"type 'purchase': .*anyOf.* \(at /type\)"),
        (
            '{"purchase": {"properties": {"amount": {"minimum": "0"}}}}',
            r"type 'purchase': .* \(at /properties/amount/minimum\)",
        ),
        ('{"purchase": {"format": "emial"}}', "type 'purchase': Unknown format: 'emial'"),
        ('{"purchase": {"pattern": "("}}', r"type 'purchase': .*regex.* \(at /pattern\)"),
        (
            '{"purchase": {"$ref": "https://schemas.example/purchase.json"}}',
            "references outside the plan are not followed",
        ),
        ('{"purchase": {"$ref": "#/$defs/missing"}}', "type 'purchase': Pointer '/\\$defs/missing' does not exist"),
        (
            '{"purchase": {"$schema": "http://json-schema.org/draft-07/schema#"}}',
            "type 'purchase': \\$schema must be https://json-schema.org/draft/2020-12/schema",
        ),
        ('{"": {}}', "type '' must be 1 to 256 characters"),
    ],
)
def test_a_bad_plan_stops_the_start(tmp_path, text, message):
    """A plan that does not parse, or a type whose schema is not a valid 2020-12 schema: one line naming it."""
    with pytest.raises(SettingsError, match=message) as caught:
        plan_app(tmp_path, text)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"TRACKING_PLAN": "/nonexistent/plan.json"},
            "TRACKING_PLAN: cannot read '/nonexistent/plan.json': No such file",
        ),
        ({"TRACKING_PLAN": ["a.json"]}, "TRACKING_PLAN must be the path of a JSON file"),
        ({"TRACKING_PLAN_MODE": "reject"}, "TRACKING_PLAN_MODE is reject but TRACKING_PLAN names no plan file"),
        ({"TRACKING_PLAN_MODE": "strict"}, "TRACKING_PLAN_MODE must be off, flag or reject, not 'strict'"),
        ({"TRACKING_PLAN_UNPLANNED": "drop"}, "TRACKING_PLAN_UNPLANNED must be allow, flag or reject, not 'drop'"),
    ],
)
def test_bad_plan_settings_stop_the_start(settings, message):
    """Each plan setting is checked at start."""
    with pytest.raises(SettingsError, match=message):
        create_app({"TESTING": True, **settings})


def test_plan_settings_from_the_environment(monkeypatch, capfd):
    """ANALYTICS_TRACKING_PLAN is a path as it is written; the modes are plain words."""
    monkeypatch.setenv("ANALYTICS_TRACKING_PLAN", str(EXAMPLE_PLAN))
    monkeypatch.setenv("ANALYTICS_TRACKING_PLAN_MODE", "reject")
    monkeypatch.setenv("ANALYTICS_TRACKING_PLAN_UNPLANNED", "allow")
    app = create_app({"TESTING": True})
    assert app.test_client().get("/api/tracking-plan").json["mode"] == "reject"
    status, answer, _ = send(app, capfd, [{"type": "signup_click", "payload": {"plan": "gold"}}, {"type": "x"}])
    assert (status, answer["rejected"]) == (
        200,
        [{"index": 0, "errors": {"/payload/plan": ['Must be one of: "free", "pro", "team".']}}],
    )


# --- cost ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [10, 100])
def test_a_ten_type_plan_in_reject_mode_keeps_most_of_the_throughput(capfd, batch):
    """The bench's events (plans/bench.json has their types and seven more) cost at most 1.25 times the CPU with the
    plan in reject mode than without a plan: at least 0.8 of the events per CPU second. Timed in turns in one
    process, the median of several rounds; bench/run.py --variant measures the same with gunicorn and wrk."""
    body = make_body(batch)
    plain = create_app({"TESTING": True}).test_client()
    planned = create_app(
        {
            "TESTING": True,
            "TRACKING_PLAN": str(ROOT / "plans" / "bench.json"),
            "TRACKING_PLAN_MODE": "reject",
            "TRACKING_PLAN_UNPLANNED": "reject",
        }
    ).test_client()
    assert planned.post("/api/analytics", data=body).json == {"success": True, "received": batch}
    requests = 1000 // batch

    def cpu(client: Any) -> float:
        start = time.process_time()
        for _ in range(requests):
            client.post("/api/analytics", data=body)
        capfd.readouterr()
        return time.process_time() - start

    # Short rounds, many of them, which goes first alternating: a busy machine's slow spells hit both alike.
    ratios = []
    for round_ in range(15):
        if round_ % 2:
            ratios.append(cpu(plain) / cpu(planned))
        else:
            planned_cpu = cpu(planned)
            ratios.append(cpu(plain) / planned_cpu)
    ratio = statistics.median(ratios)
    print(f"batch {batch}: events per CPU second with the plan / without: {ratio:.3f} (rounds {ratios})")
    assert ratio >= 0.8


def _events_body(event: bytes, count: int) -> bytes:
    """A batch of ``count`` copies of one event's JSON."""
    return b'{"events":[' + b",".join([event] * count) + b"]}"


# Payloads made to have as many violations per byte as can be: the costliest to explain.
HOSTILE_PLAN = {
    "a": {"type": "object", "properties": {"x": {"items": {"type": "string"}}}, "additionalProperties": False}
}
HOSTILE_BODIES = {
    "dense_small_payloads": _events_body(b'{"type":"a","payload":{"x":[' + b",".join([b"0"] * 120) + b"]}}", 1000),
    "dense_large_payloads": _events_body(b'{"type":"a","payload":{"x":[' + b",".join([b"0"] * 15000) + b"]}}", 30),
    "unknown_keys": _events_body(
        b'{"type":"a","payload":{' + b",".join(b'"%d":0' % i for i in range(50)) + b"}}", 1000
    ),
}


def test_explaining_violations_costs_at_most_a_few_valid_batches(tmp_path, capfd):
    """Bodies of events with as many violations as fit cost, in flag mode, no more than tests/test_bounds.py allows
    any body (a few times a valid batch of a thousand events without a plan), measured in turns, CPU time."""
    planned = plan_app(tmp_path, HOSTILE_PLAN, TRACKING_PLAN_MODE="flag").test_client()
    for name, body in HOSTILE_BODIES.items():
        assert len(body) <= Config.MAX_BODY_BYTES, name
        answer = planned.post("/api/analytics", data=body).json
        assert len(answer["flagged"]) == answer["received"] > 0, name
    ratios = cpu_over_valid(capfd, {name: (planned, body) for name, body in HOSTILE_BODIES.items()})
    assert max(ratios.values()) <= WORST_OVER_VALID, ratios
