"""HTTP clients: a keep-alive connection from a chosen loopback address, and what a polite client never does: a
request sent a piece at a time, a raw socket read to its end."""

import http.client
import socket
import time
from typing import Any

from tests.harness.lines import strict_json

# An address of this host that the service does not trust as a proxy: a client elsewhere, as far as it knows.
OUTSIDER = "127.0.0.2"


def connect(port: int, source: str | None = None) -> http.client.HTTPConnection:
    """A keep-alive HTTP/1.1 connection to a loopback port, from ``source`` if given."""
    return http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0) if source else None)


def send(port: int, body: bytes, timeout: float = 30) -> tuple[int, dict[str, str], Any]:
    """POST ``body`` to /api/analytics on a new connection; raise OSError or HTTPException if it breaks."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/api/analytics", body, {"Content-Type": "application/json", "Connection": "close"})
        response = connection.getresponse()
        return response.status, dict(response.headers), strict_json(response.read())
    finally:
        connection.close()


class SlowUpload:
    """A POST to /api/analytics sent a piece at a time: a request in a worker's (or a proxy's) hands, unfinished."""

    def __init__(
        self, port: int, body: bytes, source: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source or "", 0))
        head = {
            "Host": f"127.0.0.1:{port}",
            "Content-Type": "application/json",
            "Content-Length": str(len(body)),
            "Connection": "close",
            **(headers or {}),
        }
        self.data = (
            b"POST /api/analytics HTTP/1.1\r\n"
            + "".join(f"{name}: {value}\r\n" for name, value in head.items()).encode()
            + b"\r\n"
            + body
        )
        self.sent = 0

    @property
    def port(self) -> int:
        """The client's own port, which names the connection on the server's side."""
        return self.sock.getsockname()[1]

    @property
    def done(self) -> bool:
        """Whether the whole request has been sent."""
        return self.sent == len(self.data)

    def send(self, size: int) -> None:
        """Send the next ``size`` bytes of the request (fewer at its end)."""
        part = self.data[self.sent : self.sent + size]
        self.sock.sendall(part)
        self.sent += len(part)

    def finish(self) -> tuple[int, dict[str, str], Any]:
        """Send the rest and read the answer; raise OSError or HTTPException if the connection breaks."""
        try:
            self.send(len(self.data))
            response = http.client.HTTPResponse(self.sock, method="POST")
            response.begin()
            return response.status, dict(response.headers), strict_json(response.read())
        finally:
            self.sock.close()


def read_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes, and whether it closed within ``limit`` seconds."""
    deadline = time.monotonic() + limit
    data = b""
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data, False
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response: status, headers (lower-case names) and the body its Content-Length gives."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", len(rest)))
    return int(status_line.split()[1]), headers, rest[:length]
