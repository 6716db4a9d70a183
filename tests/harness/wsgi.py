"""Requests through the Flask test client that a real server would otherwise have to make: a body without a
Content-Length (chunked, as gunicorn hands it on), and bodies read from a socket whose peer stalls or leaves."""

import io
import socket
from typing import Any

from flask.testing import FlaskClient


def chunked(data: bytes) -> dict[str, Any]:
    """Request arguments for a body with no Content-Length, as a chunked one reaches the app from gunicorn."""
    environ = {"wsgi.input_terminated": True, "CONTENT_LENGTH": "", "HTTP_TRANSFER_ENCODING": "chunked"}
    return {"input_stream": io.BytesIO(data), "environ_overrides": environ}


def sized(data: bytes) -> dict[str, Any]:
    """Request arguments for a body with a Content-Length."""
    return {"data": data}


class SocketBody:
    """wsgi.input as gunicorn makes it: reads straight from the client's socket until it has ``size`` bytes."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def read(self, size: int) -> bytes:
        """``size`` bytes, or fewer if the peer closes first."""
        data = b""
        while len(data) < size and (chunk := self.sock.recv(size - len(data))):
            data += chunk
        return data


def stalled_body_request(client: FlaskClient) -> Any:
    """POST through a real socket whose peer sends 10 of the 100 bytes it announced, then goes quiet."""
    server_end, client_end = socket.socketpair()
    with server_end, client_end:
        client_end.sendall(b'{"events":')
        environ = {
            "wsgi.input": SocketBody(server_end),
            "gunicorn.socket": server_end,
            "wsgi.input_terminated": True,
            "CONTENT_LENGTH": "100",
        }
        return client.post("/api/analytics", environ_overrides=environ)
