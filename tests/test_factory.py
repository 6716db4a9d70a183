"""The factory: defaults, then the environment, then the caller's mapping."""

import os

import pytest

from app import create_app
from config import Config


def test_defaults(monkeypatch):
    """Without overrides the app runs on config.py's defaults."""
    for name in [name for name in os.environ if name.startswith("ANALYTICS_")]:
        monkeypatch.delenv(name)
    app = create_app()
    assert not app.testing
    assert app.config["MAX_BODY_BYTES"] == Config.MAX_BODY_BYTES == 1024 * 1024
    assert app.config["MAX_EVENTS"] == 1000
    assert app.config["MAX_EVENT_BYTES"] == 32 * 1024


def test_mapping_wins_over_environment(monkeypatch):
    """The caller's mapping is applied last."""
    monkeypatch.setenv("ANALYTICS_MAX_EVENTS", "5")
    assert create_app({"TESTING": True, "MAX_EVENTS": 7}).config["MAX_EVENTS"] == 7
    assert create_app({"TESTING": True}).config["MAX_EVENTS"] == 5


def test_wsgi_module_exposes_the_app():
    """wsgi:app, as the Procfile names it, is a built app serving the health check."""
    import wsgi

    response = wsgi.app.test_client().get("/healthz")
    assert (response.status_code, response.json) == (200, {"status": "ok"})


@pytest.mark.parametrize(
    ("variable", "value", "setting", "expected"),
    [
        ("ANALYTICS_REDACT_KEYS", "password, token", "REDACT_KEYS", ["password", "token"]),
        ("ANALYTICS_REDACT_KEYS", '["email"]', "REDACT_KEYS", ["email"]),
        ("ANALYTICS_TRUSTED_PROXIES", "10.0.0.1,10.0.0.2", "TRUSTED_PROXIES", ["10.0.0.1", "10.0.0.2"]),
        ("ANALYTICS_CORS_ORIGINS", "https://shop.example", "CORS_ORIGINS", ["https://shop.example"]),
        ("ANALYTICS_CORS_ORIGINS", "*", "CORS_ORIGINS", "*"),
        # As browsers write Origin: lower case, no default port; else it would never match.
        (
            "ANALYTICS_CORS_ORIGINS",
            "HTTPS://Shop.Example:443,http://a.example:80",
            "CORS_ORIGINS",
            ["https://shop.example", "http://a.example"],
        ),
        ("ANALYTICS_CORS_ORIGINS", "https://shop.example:8443", "CORS_ORIGINS", ["https://shop.example:8443"]),
        ("ANALYTICS_CLIENT_IP", "full", "CLIENT_IP", "full"),
        ("ANALYTICS_EXCLUDE_IPS", "10.0.0.0/8,2001:db8::/32", "EXCLUDE_IPS", ["10.0.0.0/8", "2001:db8::/32"]),
        ("ANALYTICS_BODY_READ_TIMEOUT", "2", "BODY_READ_TIMEOUT", 2),
    ],
)
def test_environment_values_are_read_as_meant(monkeypatch, variable, value, setting, expected):
    """Lists may be JSON arrays or comma-separated; JSON scalars keep their type."""
    monkeypatch.setenv(variable, value)
    assert create_app({"TESTING": True}).config[setting] == expected


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ANALYTICS_PARSE_USER_AGENT", "False"),
        ("ANALYTICS_CLIENT_IP", "partial"),
        ("ANALYTICS_MAX_EVENTS", "lots"),
        ("ANALYTICS_MAX_BODY_BYTES", "0"),
        ("ANALYTICS_LOG_WRITE_TIMEOUT", "-1"),
        # JSON numbers that are no timeout: they used to start, then every POST was a 500.
        ("ANALYTICS_BODY_READ_TIMEOUT", "NaN"),
        ("ANALYTICS_BODY_READ_TIMEOUT", "1e308"),
        ("ANALYTICS_BODY_READ_TIMEOUT", "0.0000001"),
        ("ANALYTICS_LOG_WRITE_TIMEOUT", "Infinity"),
        ("ANALYTICS_NATS_DUPLICATE_WINDOW", "NaN"),
        ("ANALYTICS_REDACT_KEYS", "[1, 2]"),
        ("ANALYTICS_TRUSTED_PROXIES", '{"a": 1}'),
    ],
)
def test_mistyped_settings_stop_the_start(monkeypatch, variable, value):
    """A setting of the wrong type is an error naming it, not a service quietly doing something else."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=variable.removeprefix("ANALYTICS_")):
        create_app()
