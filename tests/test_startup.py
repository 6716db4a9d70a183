"""Starting and stopping: a bad setting is one clear line, a misspelled one a warning, and no line
of a worker carries a request id that is not its own."""

import json

import pytest

from app import create_app
from tests.harness.gunicorn import refusal, run_gunicorn


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("ANALYTICS_MAX_EVENTS", "lots", "MAX_EVENTS must be a positive integer, not 'lots'"),
        ("ANALYTICS_TRUSTED_PROXIES", "10.0.0.1,nginx", "TRUSTED_PROXIES: 'nginx' is not an address"),
        ("ANALYTICS_CORS_ORIGINS", "https://shop.example/", "CORS_ORIGINS: 'https://shop.example/' is not an origin"),
        ("ANALYTICS_REDACT_KEYS", " , ", "REDACT_KEYS"),
        ("ANALYTICS_METRICS_ALLOW", "10.0.0.0/8,prometheus", "METRICS_ALLOW: 'prometheus' is not an address"),
    ],
)
def test_bad_setting_stops_gunicorn_with_one_line(variable, value, named):
    """With several workers, a bad setting is one line on stderr naming it and its value, and exit status 1."""
    assert named in refusal(run_gunicorn({variable: value}))


def test_misspelled_variable_is_a_warning(monkeypatch, capfd):
    """An ANALYTICS_* variable that names no setting is reported at start, by name; the service still starts."""
    monkeypatch.setenv("ANALYTICS_MAX_EVENT", "500")
    create_app({"TESTING": True})
    warnings = [json.loads(line) for line in capfd.readouterr().err.splitlines() if "unknown_setting" in line]
    assert [(line["level"], line["variable"]) for line in warnings] == [("warning", "ANALYTICS_MAX_EVENT")]


def test_worker_lines_after_a_request_carry_no_request_id(start_server):
    """The request id is unbound when its response is done: gunicorn's later lines of that worker
    (here "Worker exiting" at shutdown) do not carry it, while the access line of the request does."""
    server = start_server(workers=1, env={"GUNICORN_CMD_ARGS": "--access-logfile -"})
    status, headers, _ = server.post("/api/analytics", b'{"events": [{"type": "a"}]}')
    assert status == 200
    assert server.stop() == 0
    lines = [json.loads(line) for line in server.stderr_path.read_text().splitlines()]
    access = [line for line in lines if line.get("logger") == "gunicorn.access"]
    # One access line per request (the harness's /healthz first), each with that request's own id.
    ids = [line.get("request_id") for line in access]
    assert ids[-1] == headers["X-Request-ID"] and len(set(ids)) == len(ids) == 2
    exiting = [line for line in lines if line["event"].startswith("Worker exiting")]
    assert exiting and all("request_id" not in line for line in exiting), exiting
