"""Who sent a request: the client's address and the request id, believing only trusted proxies."""

import ipaddress
import itertools
import os
import re
from collections.abc import Iterable
from functools import lru_cache

# A proxy's X-Request-ID is taken only if it looks like an id, not like an attack on log readers.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


class RequestIds:
    """New request ids: a random prefix per process and a counter, unique without a system call each."""

    def __init__(self) -> None:
        self._reset()
        # A forked worker must not repeat its parent's ids (gunicorn's --preload forks a built app).
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        # One tuple, swapped whole, so that threads never see half of it.
        self._state = (os.urandom(8).hex(), itertools.count())

    def new(self) -> str:
        prefix, counter = self._state
        return f"{prefix}{next(counter):016x}"


REQUEST_IDS = RequestIds()


class Peers:
    """Decides, from TRUSTED_PROXIES, which forwarded headers to believe."""

    def __init__(self, trusted: Iterable[str]) -> None:
        self._networks = tuple(ipaddress.ip_network(entry, strict=False) for entry in trusted)
        self.is_trusted = lru_cache(maxsize=1024)(self._is_trusted)

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.strip())
        except ValueError:
            return False
        return any(ip in network for network in self._networks)

    def identify(self, environ: dict) -> tuple[str, str | None]:
        """The request's id and its client's address, believing forwarded headers from trusted proxies only.

        The id is the trusted proxy's X-Request-ID where it sent a sane one, else a
        new one; the address is the nearest one in X-Forwarded-For that is not a
        trusted proxy of ours. Read from the WSGI environ: this runs on every request.
        """
        address = environ.get("REMOTE_ADDR")
        if not address or not self.is_trusted(address):
            return REQUEST_IDS.new(), address
        incoming = environ.get("HTTP_X_REQUEST_ID")
        request_id = incoming if incoming and REQUEST_ID_PATTERN.fullmatch(incoming) else REQUEST_IDS.new()
        for hop in reversed(environ.get("HTTP_X_FORWARDED_FOR", "").split(",")):
            hop = hop.strip()
            if not hop:
                break
            address = hop
            if not self.is_trusted(address):
                break
        return request_id, address
