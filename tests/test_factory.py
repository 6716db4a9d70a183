"""The factory: defaults, then the environment, then the caller's mapping."""

from app import create_app
from config import Config


def test_defaults():
    """Without overrides the app runs on config.py's defaults."""
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
