"""A real redis-server for the tests: on a free loopback port and a unix socket, with a directory of its own."""

import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.harness.gunicorn import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    """redis-server in the foreground, nothing saved to disk; ``stop`` and ``start`` again keep its port and socket."""

    def __init__(self, tmp_path: Path, port: int | None = None) -> None:
        self.dir = tmp_path / "redis"
        self.dir.mkdir(exist_ok=True)
        self.port = port or free_port()
        self.socket = self.dir / "redis.sock"
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.unix_url = f"redis+unix://{self.socket}"
        self.log = self.dir / "redis.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 10) -> "RedisServer":
        """Start redis-server and wait until it answers PING."""
        command = [
            REDIS_SERVER,
            *("--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)),
            *("--unixsocket", str(self.socket), "--unixsocketperm", "700"),
            *("--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", str(self.log)),
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text() if self.log.exists() else "redis-server exited"
            if self.ping():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start: {self.log.read_text()}")

    def ping(self) -> bool:
        """Whether redis answers PING on its port now."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop redis-server (SIGTERM) and wait for it."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
