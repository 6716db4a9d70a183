"""Fixtures: the app built by the factory, its test client, and real gunicorn."""

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from tests.server import Server


@pytest.fixture
def app() -> Flask:
    """The app with test settings."""
    return create_app({"TESTING": True})


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A test client for the app."""
    return app.test_client()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start real gunicorn (``start_server(workers=4, env={...})``); every one is stopped afterwards."""
    servers: list[Server] = []

    def start(**kwargs) -> Server:
        server = Server(tmp_path, **kwargs).start()
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()
