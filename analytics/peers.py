"""Who sent a request: the client's address and the request id, believing only trusted proxies."""

import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

# A proxy's X-Request-ID is taken only if it looks like an id, not like an attack on log readers.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
# The longest text an address can be: IPv6 with an embedded IPv4, 45 characters (scope ids are refused).
MAX_ADDRESS_CHARS = 45

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def new_request_id() -> str:
    """A fresh random id: unique, and unlike a counter it tells a client nothing about the request volume."""
    return os.urandom(16).hex()


# Cached because a proxy sends the same few addresses over and over; keys are at most
# MAX_ADDRESS_CHARS long, so the cache holds at most 1024 short strings whatever clients send.
@lru_cache(maxsize=1024)
def _parse_short(text: str) -> IPAddress | None:
    # An IPv6 scope ("fe80::1%eth0") may be any text, and names an interface of the sender, not us.
    if "%" in text:
        return None
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    # An IPv4 client reaching a dual-stack socket shows up as ::ffff:a.b.c.d: it is that IPv4 address.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


def parse_address(text: str) -> IPAddress | None:
    """``text`` as an address (an IPv4-mapped IPv6 one as its IPv4 address), or None if it is not one."""
    text = text.strip()
    if len(text) > MAX_ADDRESS_CHARS:
        return None
    return _parse_short(text)


@dataclass(frozen=True)
class Sender:
    """Who sent a request: its id, the client's address (None when the server gave none), and the headers that
    say what sent it and to which site (for the enrichment of its lines: analytics/enrich.py)."""

    request_id: str
    client_ip: str | None
    user_agent: str = ""
    host: str = ""
    origin: str = ""


class Peers:
    """Decides, from TRUSTED_PROXIES, which forwarded headers to believe."""

    def __init__(self, trusted: Iterable[str]) -> None:
        # config.check_settings has made sure every entry parses.
        self._networks = tuple(ipaddress.ip_network(entry, strict=False) for entry in trusted)
        # Keyed by parsed addresses, which are small whatever a client sends.
        self._is_trusted = lru_cache(maxsize=1024)(self._in_networks)

    def _in_networks(self, ip: IPAddress) -> bool:
        return any(ip in network for network in self._networks)

    def identify(self, environ: dict) -> Sender:
        """The request's id and its client's address, believing forwarded headers from trusted proxies only.

        The id is the trusted proxy's X-Request-ID where it sent a sane one, else a
        new one; the address is the nearest one in X-Forwarded-For that is not a
        trusted proxy of ours. A hop that is not an address ends the walk: what lies
        beyond it cannot be believed, so the last address before it is the client's.
        Read from the WSGI environ: this runs on every request.
        """
        peer = parse_address(environ.get("REMOTE_ADDR") or "")
        agent = environ.get("HTTP_USER_AGENT", "")
        host = environ.get("HTTP_HOST", "")
        origin = environ.get("HTTP_ORIGIN", "")
        if peer is None or not self._is_trusted(peer):
            return Sender(new_request_id(), str(peer) if peer else None, agent, host, origin)
        incoming = environ.get("HTTP_X_REQUEST_ID")
        request_id = incoming if incoming and REQUEST_ID_PATTERN.fullmatch(incoming) else new_request_id()
        address = peer
        for hop in reversed(environ.get("HTTP_X_FORWARDED_FOR", "").split(",")):
            ip = parse_address(hop)
            if ip is None:
                break
            address = ip
            if not self._is_trusted(ip):
                break
        return Sender(request_id, str(address), agent, host, origin)
