"""Real gunicorn for end-to-end tests: started on a free loopback port, its stdout read through a pipe."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = Path(sys.executable).with_name("gunicorn")


def strict_json(text: bytes | str) -> Any:
    """Parse JSON as RFC 8259 has it: NaN and Infinity, which Python allows, are errors."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def free_port() -> int:
    """A loopback port nobody is listening on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """gunicorn serving wsgi:app with the production gunicorn.conf.py.

    stdout is a pipe, as under systemd or a platform's log router, drained by a
    thread into ``stdout``; stderr goes to a file for the diagnostics.
    """

    def __init__(self, tmp_path: Path, workers: int = 2, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stderr_path = tmp_path / f"gunicorn-{self.port}.stderr"
        self.stdout = bytearray()
        self._env = {
            **os.environ,
            "PORT": str(self.port),
            "WEB_CONCURRENCY": str(workers),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.process: subprocess.Popen | None = None

    def start(self) -> "Server":
        """Start gunicorn and wait until /healthz answers."""
        self.process = subprocess.Popen(
            [str(GUNICORN), "wsgi:app", "--bind", f"127.0.0.1:{self.port}"],
            cwd=ROOT,
            env=self._env,
            stdout=subprocess.PIPE,
            stderr=self.stderr_path.open("wb"),
        )
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {self.stderr_path.read_text()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"gunicorn did not start: {self.stderr_path.read_text()}")

    def _drain(self) -> None:
        assert self.process and self.process.stdout
        while chunk := os.read(self.process.stdout.fileno(), 1 << 16):
            self.stdout += chunk

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal gunicorn, wait for it to exit and for stdout to be read to its end."""
        assert self.process
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout)
        self._reader.join(timeout)
        return code

    def lines(self) -> list[dict[str, Any]]:
        """Every stdout line as JSON; fails the test on any line that is not a JSON object."""
        raw = bytes(self.stdout)
        assert raw == b"" or raw.endswith(b"\n"), "stdout ends in a partial line"
        return [strict_json(line) for line in raw.split(b"\n")[:-1]]

    def wait_for_lines(self, count: int, timeout: float = 10) -> list[dict[str, Any]]:
        """The stdout lines once there are at least ``count`` of them."""
        deadline = time.monotonic() + timeout
        while self.stdout.count(b"\n") < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.lines()

    def post(
        self, path: str, body: bytes, headers: dict[str, str] | None = None, timeout: float = 30
    ) -> tuple[int, dict[str, str], Any]:
        """POST raw bytes; return status, headers and the parsed JSON body (errors too)."""
        request = urllib.request.Request(self.url + path, data=body, headers=headers or {}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, dict(response.headers), json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), json.loads(error.read())
