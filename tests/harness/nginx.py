"""Real nginx for the tests: Debian's nginx in the foreground running deploy/nginx.conf in front of a gunicorn."""

import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness.gunicorn import ROOT, free_port
from tests.harness.lines import strict_json

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
CONF = ROOT / "deploy" / "nginx.conf"

needs_nginx = pytest.mark.skipif(
    not os.access(NGINX, os.X_OK), reason=f"nginx is not installed ({NGINX}); apt-get install nginx"
)


def ipv6_loopback() -> bool:
    """Whether ::1 can be bound here (some containers have no IPv6)."""
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


class Nginx:
    """Debian's nginx in the foreground with deploy/nginx.conf, its ports and log directory the only changes."""

    def __init__(self, tmp_path: Path, upstream_port: int) -> None:
        self.dir = tmp_path / f"nginx-{upstream_port}"
        self.dir.mkdir()
        self.port = free_port()
        self.access_log = self.dir / "analytics.access.log"
        self.error_log = self.dir / "error.log"
        site = CONF.read_text()
        for old, new in [
            ("server 127.0.0.1:8000;", f"server 127.0.0.1:{upstream_port};"),
            ("listen 80;", f"listen 127.0.0.1:{self.port};"),
            ("listen [::]:80;", f"listen [::1]:{self.port};" if ipv6_loopback() else ""),
            ("/var/log/nginx/", f"{self.dir}/"),
        ]:
            assert old in site, f"deploy/nginx.conf no longer has {old!r}"
            site = site.replace(old, new)
        (self.dir / "analytics.conf").write_text(site)
        # Only what a distribution's nginx.conf provides around the site: the main context.
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
        (self.dir / "nginx.conf").write_text(
            f"""{user}
worker_processes 1;
daemon off;
pid {self.dir}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    default_type application/octet-stream;
    client_body_temp_path {self.dir}/client_body;
    proxy_temp_path {self.dir}/proxy;
    fastcgi_temp_path {self.dir}/fastcgi;
    uwsgi_temp_path {self.dir}/uwsgi;
    scgi_temp_path {self.dir}/scgi;
    access_log {self.dir}/access.log;
    include {self.dir}/analytics.conf;
}}
"""
        )
        self.process: subprocess.Popen | None = None

    def start(self) -> "Nginx":
        """Start nginx and wait until it accepts connections."""
        command = [NGINX, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"), "-e", str(self.error_log)]
        check = subprocess.run([*command, "-t"], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        assert "[warn]" not in check.stderr, check.stderr
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.error_log.read_text()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nginx did not start: {self.error_log.read_text()}")

    def stop(self) -> None:
        """Stop nginx (SIGTERM: at once) and wait for it."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def access(self) -> list[dict[str, Any]]:
        """The whole JSON lines of the site's access log so far."""
        raw = self.access_log.read_bytes()
        return [strict_json(line) for line in raw[: raw.rfind(b"\n") + 1].splitlines()]
