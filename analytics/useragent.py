"""User agents parsed into a line's ``ua`` and ``bot`` fields, with a cache bounded in bytes.

Parsing is ua-parser's (the uap-core rules, precompiled by ua-parser-builtins)
run by ua-parser-rs, the Rust resolver: Rust's regex engine takes time linear in
the string whatever the rules and the string are, which matters for a header
every client chooses. Measured against the other resolvers of ua-parser on
this machine, per user agent not seen before (docs/event-log.md has the table):
Rust 52 µs, re2 74 µs (and the rule that matched then runs in Python's re),
pure Python 1,050 µs (86 ms for an 8 KiB string made to backtrack). The price
is memory: a gunicorn worker holds 68 MiB with it built instead of 41, which is
why parsing is a setting (PARSE_USER_AGENT), off by default, and this module is
only imported when it is on.
"""

import re
import sys
import threading
from typing import Any

from ua_parser import Domain, load_lazy_builtins
from ua_parser.regex import Resolver

# Characters of the header that are parsed and that key the cache. Real user agents are under
# 300 characters; past this they are padding, and parsing takes time in proportion to length.
MAX_UA_CHARS = 512
# Characters kept of each parsed field. The rules copy parts of the header into the fields
# (a device model, a version), so they are as long as a client makes them: cut here, and
# only printable ASCII kept, a field takes at most twice this in JSON (\" and \\).
MAX_FIELD_CHARS = 48
# Bytes the cache may hold, keys, fields and its own bookkeeping counted: about 5,700 user
# agents of real length (730 bytes each), 3,600 of the longest. Past it the oldest make room.
CACHE_BYTES = 4 * 1024 * 1024
# What a cached entry costs besides its strings: the dict holding its fields, two pairs (the
# parse and its size), and its slot in the cache's table (an entry and its index, with room).
ENTRY_OVERHEAD = (
    sys.getsizeof({"browser": 0, "browser_version": 0, "os": 0, "device": 0}) + 2 * sys.getsizeof((0, 0)) + 48
)
# Markers of browsers driven by programs: headless Chrome (which Playwright and Puppeteer run,
# and Chrome's new headless mode too), PhantomJS, SlimerJS, Lighthouse audits, and the
# automation tools that put their own names in the header. uap-core's own crawler rules
# (device family "Spider": Googlebot, bingbot, GPTBot...) catch the crawlers.
HEADLESS = re.compile(r"Headless|PhantomJS|SlimerJS|Lighthouse|Puppeteer|Playwright|Cypress|Selenium")
# The device family uap-core gives crawlers.
SPIDER = "Spider"
UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")

Parsed = tuple[dict[str, str], bool]


def clean(value: str | None, unknown: str = "Other") -> str:
    """A parsed field as a line holds it: printable ASCII only, at most MAX_FIELD_CHARS characters; ``unknown`` if
    nothing is left ("Other" is what uap-core calls what it does not know)."""
    return UNPRINTABLE.sub("", value or "")[:MAX_FIELD_CHARS] or unknown


class BoundedCache:
    """A dict whose entries' declared sizes stay within ``max_bytes``; the oldest entries leave first.

    Reads take no lock (a dict read is atomic under the GIL); writes, which happen
    only for user agents not seen before, take one, so gthread workers keep the count right.
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


class UserAgents:
    """The ``ua`` fields and bot flag of User-Agent headers, parsed once each and then read from the cache."""

    def __init__(self, cache_bytes: int = CACHE_BYTES) -> None:
        self.cache = BoundedCache(cache_bytes)
        # Built on first use, in the process that parses: gunicorn's master only builds the app to
        # check the settings, and would otherwise hold the rules for nothing (gunicorn.conf.py builds
        # it in each worker before its first request).
        self._resolver: Resolver | None = None
        self._building = threading.Lock()

    def build(self) -> Resolver:
        """The parser, built now if it is not yet (half a second)."""
        with self._building:
            if self._resolver is None:
                self._resolver = Resolver(load_lazy_builtins())
            return self._resolver

    def parse(self, header: str) -> Parsed:
        """``header``'s fields (browser, browser_version when known, os, device) and whether it is a bot."""
        text = header[:MAX_UA_CHARS]
        parsed = self.cache.get(text)
        if parsed is None:
            parsed = self._parse(text)
            size = sys.getsizeof(text) + sum(sys.getsizeof(field) for field in parsed[0].values()) + ENTRY_OVERHEAD
            self.cache.put(text, parsed, size)
        return parsed

    def _parse(self, text: str) -> Parsed:
        """``text`` parsed afresh."""
        resolver = self._resolver or self.build()
        result = resolver(text, Domain.ALL)
        agent, system, device = result.user_agent, result.os, result.device
        fields = {"browser": clean(agent and agent.family)}
        if agent and agent.major:
            # As far as it is known: "131.0.6778.81", "18.1", "2".
            known = []
            for part in (agent.major, agent.minor, agent.patch, agent.patch_minor):
                if not part:
                    break
                known.append(part)
            version = clean(".".join(known), unknown="")
            if version:
                fields["browser_version"] = version
        fields["os"] = clean(system and system.family)
        fields["device"] = clean(device and device.family)
        bot = (device is not None and device.family == SPIDER) or HEADLESS.search(text) is not None
        return fields, bot
