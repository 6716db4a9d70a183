"""Enrichment: what a line carries besides the event and the request's id and times, and which requests are dropped.

One step between checking a batch and writing it (``Enricher.enrich``). The
request-level fields are worked out once per request and put in the line
context, which is rendered once for all the request's lines; only the derived
timestamp is per event. Each field comes from a setting, and a setting that is
off adds no field and no work (docs/enrichment.md):

- ``client_ip`` (CLIENT_IP): the client's address, anonymized by default;
- ``visitor_id`` (VISITOR_ID_SECRET): a keyed hash of the day, address, user agent and site;
- ``bot`` (BOTS, on by default: ``true`` on a bot's lines only) and BOTS=drop;
- ``ua`` (PARSE_USER_AGENT);
- EXCLUDE_IPS: networks whose events are answered as usual and not written;
- ``derived_timestamp`` (DERIVED_TIMESTAMP): the event's time corrected by the client's clock offset.
"""

import hashlib
import hmac
import ipaddress
import sys
import threading
from collections.abc import Callable, Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

from analytics.peers import Sender, parse_address

# Bits of the HMAC kept as the visitor id: 16 hex characters. Two visitors of one day share an
# id with probability n²/2⁶⁵ for n visitors: one in 370,000 for a site of ten million a day.
# More bits would only lengthen every line; the secret, not the length, keeps ids unguessable.
VISITOR_ID_BITS = 64
# IPv4 keeps its first 24 bits (the last octet zeroed), IPv6 its first 48 (the site's prefix
# an ISP hands out, the customer's own 16 bits of subnets and 64 of interface dropped).
IPV4_KEPT_BITS = 24
IPV6_KEPT_BITS = 48
IPV4_MASK = ((1 << IPV4_KEPT_BITS) - 1) << (32 - IPV4_KEPT_BITS)
IPV6_MASK = ((1 << IPV6_KEPT_BITS) - 1) << (128 - IPV6_KEPT_BITS)
# A 6to4 address (2002::/16) holds its site's IPv4 address in bits 16 to 48, which a /48 would keep whole:
# it keeps 16 + 24 bits instead, that address cut as an IPv4 address is.
SIX_TO_FOUR = ipaddress.ip_network("2002::/16")
SIX_TO_FOUR_MASK = ((1 << (16 + IPV4_KEPT_BITS)) - 1) << (128 - 16 - IPV4_KEPT_BITS)

# Bytes the visitor ids' cache may hold (with VISITOR_ID_SECRET): about 3,000 visitors with headers of real length
# (350 bytes each with the entry). A visitor's next request on the same day then costs a dict lookup, not an HMAC.
VISITOR_CACHE_BYTES = 1024 * 1024
# What a cached id costs besides its key: the id, the pair of it and its size, its slot in the table.
VISITOR_ENTRY_OVERHEAD = sys.getsizeof("0" * (VISITOR_ID_BITS // 4)) + sys.getsizeof((0, 0)) + 48

# Why a request's events were answered and not written, as the drop counter names it.
DROPPED_BOT = "bot"
DROPPED_EXCLUDED = "excluded"

DropCounter = Callable[[str, int], None]


class BoundedCache:
    """A dict whose entries' declared sizes stay within ``max_bytes``; the oldest entries leave first.

    Reads take no lock (a dict read is atomic under the GIL); writes, which happen
    only for keys not seen before, take one, so gthread workers keep the count right.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: dict[str, tuple[Any, int]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Any:
        """The value kept for ``key``, or None."""
        entry = self._entries.get(key)
        return entry[0] if entry is not None else None

    def put(self, key: str, value: Any, size: int) -> None:
        """Keep ``value`` for ``key``, as ``size`` bytes; one larger than the whole cache is not kept."""
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                return
            while self.bytes + size > self.max_bytes:
                # Dicts keep insertion order: the first key is the oldest.
                oldest = next(iter(self._entries))
                self.bytes -= self._entries.pop(oldest)[1]
            self._entries[key] = (value, size)
            self.bytes += size


# Keys are addresses as Peers wrote them, at most 45 characters: the cache holds at most 4096 short strings.
@lru_cache(maxsize=4096)
def anonymize(address: str) -> str:
    """``address`` with its last IPv4 octet zeroed, or an IPv6 address cut to its /48: "203.0.113.0", "2001:db8:1::"."""
    ip = ipaddress.ip_address(address)
    if ip.version == 4:
        return str(ipaddress.IPv4Address(int(ip) & IPV4_MASK))
    return str(ipaddress.IPv6Address(int(ip) & (SIX_TO_FOUR_MASK if ip in SIX_TO_FOUR else IPV6_MASK)))


def visitor_hasher(secret: str, cache_bytes: int = VISITOR_CACHE_BYTES) -> Callable[[datetime, Sender], str]:
    """The function making a request's visitor id from its day, client address, user agent and site.

    The id is the first VISITOR_ID_BITS of HMAC-SHA256 keyed with ``secret``.
    The key's inner and outer blocks are hashed once, here: each id copies them.
    Ids are cached by what they are made of (a visitor sends several batches a
    visit), within ``cache_bytes``: the HMAC was half of what enrichment cost a request.
    """
    keyed = hmac.new(secret.encode(), digestmod=hashlib.sha256)
    characters = VISITOR_ID_BITS // 4
    cache = BoundedCache(cache_bytes)

    def visitor_id(received_at: datetime, sender: Sender) -> str:
        # Header values cannot hold a newline (HTTP forbids it, gunicorn refuses it), so the
        # parts cannot run into each other: "a\nb" is never both ("a", "b") and ("a\nb", "").
        parts = (received_at.date().isoformat(), sender.client_ip or "", sender.user_agent, sender.host, sender.origin)
        message = "\n".join(parts)
        known = cache.get(message)
        if known is None:
            mac = keyed.copy()
            mac.update(message.encode("utf-8", "surrogatepass"))
            known = mac.hexdigest()[:characters]
            cache.put(message, known, sys.getsizeof(message) + VISITOR_ENTRY_OVERHEAD)
        return known

    return visitor_id


class Enricher:
    """The enrichment settings, bound once per app; ``enrich`` applies them to one request."""

    def __init__(self, settings: Mapping[str, Any], count_dropped: DropCounter | None = None) -> None:
        self.client_ip = settings["CLIENT_IP"]
        excluded = tuple(ipaddress.ip_network(entry, strict=False) for entry in settings["EXCLUDE_IPS"])
        # Keyed by parsed addresses, small whatever a client sends (as Peers does for TRUSTED_PROXIES).
        self._is_excluded = lru_cache(maxsize=1024)(lambda ip: any(ip in network for network in excluded))
        self.exclude = bool(excluded)
        self.user_agents = self.bots = None
        # Each built in the worker before it serves (build), never in gunicorn's master: the bot rules add 3.5 to
        # 4.5 MiB to a worker, the whole parser 27 (analytics/useragent.py).
        if settings["BOTS"] != "off" or settings["PARSE_USER_AGENT"]:
            from analytics.useragent import Bots, UserAgents

            self.bots = Bots() if settings["BOTS"] != "off" else None
            self.user_agents = UserAgents() if settings["PARSE_USER_AGENT"] else None
        self.drop_bots = settings["BOTS"] == "drop"
        secret = settings["VISITOR_ID_SECRET"]
        self.visitor_id = visitor_hasher(secret) if secret else None
        self.derive_timestamps = settings["DERIVED_TIMESTAMP"]
        self.count_dropped = count_dropped

    def enrich(
        self,
        events: list[dict[str, Any]],
        context: dict[str, Any],
        sender: Sender,
        received_at: datetime,
        batch_timestamp: datetime | None,
    ) -> bool:
        """Add the request's fields to ``context`` and each event's to it; False when the events are not to be
        written (an excluded address, or a bot under BOTS=drop), counted by reason."""
        if self.exclude and sender.client_ip is not None:
            ip = parse_address(sender.client_ip)
            if ip is not None and self._is_excluded(ip):
                return self._dropped(DROPPED_EXCLUDED, len(events))
        agent = sender.user_agent
        bot = self.bots is not None and bool(agent) and self.bots(agent)
        if bot and self.drop_bots:
            return self._dropped(DROPPED_BOT, len(events))
        if sender.client_ip is not None and self.client_ip != "none":
            context["client_ip"] = anonymize(sender.client_ip) if self.client_ip == "anonymized" else sender.client_ip
        if self.visitor_id is not None:
            context["visitor_id"] = self.visitor_id(received_at, sender)
        if self.user_agents is not None and agent:
            context["ua"] = self.user_agents.parse(agent)
        if bot:
            context["bot"] = True
        if self.derive_timestamps and batch_timestamp is not None:
            # The client's clock offset: how far its clock was behind ours when it sent the batch.
            offset = received_at - batch_timestamp
            for event in events:
                timestamp = event.get("timestamp")
                if timestamp is not None:
                    try:
                        event["derived_timestamp"] = timestamp + offset
                    except OverflowError:
                        # Past year 9999 or before year 1: a clock that wrong corrects nothing.
                        continue
        return True

    def build(self) -> None:
        """Build what enrichment builds on first use (the bot rules, the user agent parser): for each worker, before
        it serves."""
        if self.bots is not None:
            self.bots.build()
        if self.user_agents is not None:
            self.user_agents.build()

    def _dropped(self, reason: str, count: int) -> bool:
        """Count ``count`` events dropped for ``reason``; False, for ``enrich`` to return."""
        if self.count_dropped is not None and count:
            self.count_dropped(reason, count)
        return False
