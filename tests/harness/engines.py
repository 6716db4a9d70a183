"""What the tests of the engine sinks (NATS JetStream, Kafka) share: posting a batch, reading an answer, polling,
and the lines a server wrote."""

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import orjson

from tests.harness.clients import send
from tests.harness.gunicorn import Server
from tests.harness.lines import strict_json

# The answer to a batch a sink could not take: retry it.
UNAVAILABLE = (503, {"error": "Event store unavailable"})


def post(server: Server, events: list[dict[str, Any]]) -> tuple[int, dict[str, str], Any]:
    """POST a batch of ``events``."""
    return send(server.port, orjson.dumps({"events": events}))


def get(server: Server, path: str) -> tuple[int, Any]:
    """GET ``path``: the status and the JSON body, errors too."""
    try:
        with urllib.request.urlopen(server.url + path, timeout=30) as response:
            return response.status, strict_json(response.read())
    except urllib.error.HTTPError as error:
        return error.code, strict_json(error.read())


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition`` every 50 ms until it returns something true; that value, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.05)


def stdout_lines(server: Server) -> list[bytes]:
    """The server's stdout lines without their newlines (the server has been stopped)."""
    out = bytes(server.stdout)
    assert out == b"" or out.endswith(b"\n")
    return out.split(b"\n")[:-1]


def stderr_lines(server: Server) -> list[dict[str, Any]]:
    """The JSON lines gunicorn and the service wrote to stderr."""
    return [json.loads(line) for line in server.stderr_path.read_text().splitlines() if line.startswith("{")]
