"""Fixtures: the app built by the factory, its test client, and real gunicorn, for one test or for a module."""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from tests.harness.gunicorn import Server


@pytest.fixture
def app() -> Flask:
    """The app with test settings."""
    return create_app({"TESTING": True})


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A test client for the app."""
    return app.test_client()


@contextmanager
def servers(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """A function that starts real gunicorn (``start(workers=4, env={...})``); every one is stopped on leaving."""
    started: list[Server] = []

    def start(**kwargs: Any) -> Server:
        server = Server(tmp_path, **kwargs).start()
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start real gunicorn for this test alone (``start_server(workers=4, env={...})``)."""
    with servers(tmp_path) as start:
        yield start


@pytest.fixture(scope="module")
def start_module_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    """Start real gunicorn shared by a module's tests, stopped after its last one. Its stdout holds every
    test's lines, some arriving after the test that caused them ended: read with ``fence`` and ``lines_since``."""
    with servers(tmp_path_factory.mktemp("gunicorn")) as start:
        yield start
