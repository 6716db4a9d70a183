"""User agents: whether a User-Agent header is a bot's (``bot``), and, when asked for, its parsed ``ua`` fields.

Two checks, each cached in a cache bounded in bytes (headers are client-chosen):

- ``Bots``, on by default (BOTS): uap-core's crawler rules only (the device rules
  whose family is "Spider"), run by ua-parser-rs, plus the markers of browsers
  driven by programs. It gives the verdict the whole parser's device family gives,
  at a fraction of its memory and time: 3.5 to 4.5 MiB of a worker instead of 27.
- ``UserAgents`` (PARSE_USER_AGENT, off by default): the whole of ua-parser (the
  uap-core rules, precompiled by ua-parser-builtins) run by ua-parser-rs, the Rust
  resolver. Rust's regex engine takes time linear in the string whatever the rules
  and the string are, which matters for a header every client chooses. Measured
  against the other resolvers of ua-parser on this machine, per user agent not seen
  before (docs/enrichment.md has the table): Rust 52 µs, re2 74 µs (and the rule
  that matched then runs in Python's re), pure Python 1,050 µs (86 ms for an 8 KiB
  string made to backtrack). The price is memory: a gunicorn worker holds 68 MiB
  with it built instead of 41, which is why parsing is a setting, off by default.
"""

import ast
import importlib.util
import re
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from analytics.enrich import BoundedCache

# Characters of the header that are looked at and that key the caches. Real user agents are under
# 300 characters; past this they are padding, and checking takes time in proportion to length.
MAX_UA_CHARS = 512
# Characters kept of each parsed field. The rules copy parts of the header into the fields
# (a device model, a version), so they are as long as a client makes them: cut here, and
# only printable ASCII kept, a field takes at most twice this in JSON (\" and \\).
MAX_FIELD_CHARS = 48
# Bytes the parse cache may hold, keys, fields and its own bookkeeping counted: about 5,700 user
# agents of real length (730 bytes each), 3,600 of the longest. Past it the oldest make room.
CACHE_BYTES = 4 * 1024 * 1024
# What a cached parse costs besides its strings: the dict holding its fields, the pair of it and its
# size, and its slot in the cache's table (an entry and its index, with room).
ENTRY_OVERHEAD = sys.getsizeof({"browser": 0, "browser_version": 0, "os": 0, "device": 0}) + sys.getsizeof((0, 0)) + 48
# Bytes the bot verdicts' cache may hold: about 1,600 user agents of real length (320 bytes each
# with the entry), 800 of the longest. A verdict not cached costs 5 to 200 µs again.
BOT_CACHE_BYTES = 512 * 1024
# What a cached verdict costs besides its key: the pair of it and its size, and its slot in the table.
BOT_ENTRY_OVERHEAD = sys.getsizeof((0, 0)) + 48
# Markers of browsers driven by programs: headless Chrome (which Playwright and Puppeteer run,
# and Chrome's new headless mode too), PhantomJS, SlimerJS, Lighthouse audits, and the
# automation tools that put their own names in the header. uap-core's own crawler rules
# (device family "Spider": Googlebot, bingbot, GPTBot...) catch the crawlers.
HEADLESS = re.compile(r"Headless|PhantomJS|SlimerJS|Lighthouse|Puppeteer|Playwright|Cypress|Selenium")
# Headers the rules are run on once they are built: the engine's first allocations then happen before any request.
# Made during one, after a large body's, they pinned the top of the heap: a worker held 3 MiB more afterwards.
WARM_UP = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.6778.81 Mobile",
)
# The device family uap-core gives crawlers.
SPIDER = "Spider"
UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")


def clean(value: str | None, unknown: str = "Other") -> str:
    """A parsed field as a line holds it: printable ASCII only, at most MAX_FIELD_CHARS characters; ``unknown`` if
    nothing is left ("Other" is what uap-core calls what it does not know)."""
    return UNPRINTABLE.sub("", value or "")[:MAX_FIELD_CHARS] or unknown


def device_rules() -> list[tuple[str, str | None, str]]:
    """uap-core's device rules in their order, as ua-parser-builtins holds them: (regex, flag, family).

    Read from its lazy module's text (one ``DeviceMatcher(...)`` of literals a line),
    not imported: importing it imports ua_parser, and PyYAML with it, which only the
    whole parser needs (0.9 MiB of a worker). tests/test_enrich.py checks the two agree.
    """
    spec = importlib.util.find_spec("ua_parser_builtins.lazy")
    if spec is None or spec.origin is None:
        raise RuntimeError("ua-parser-builtins is not installed")
    rules = []
    for line in Path(spec.origin).read_text().splitlines():
        line = line.strip()
        if line.startswith("DeviceMatcher("):
            call = ast.parse(line.rstrip(","), mode="eval").body
            assert isinstance(call, ast.Call)
            regex, flag, family = ([ast.literal_eval(argument) for argument in call.args] + [None, None])[:3]
            # The matcher's own default: the family is the first group.
            rules.append((regex, flag, family or "$1"))
    if not any(family == SPIDER for _, _, family in rules):
        raise RuntimeError(f"no crawler rules in {spec.origin}: has ua-parser-builtins changed its layout?")
    return rules


# uap-core's crawler rules as Rust regexes, each named by its place in the second: for each, the device rules
# before it that are not crawlers', as Python regexes.
CrawlerRules = tuple[Any, list[tuple[re.Pattern[str], ...]]]


def crawler_rules() -> CrawlerRules:
    """uap-core's device rules of family "Spider", and for each the other device rules that take precedence over it.

    The whole parser tries the device rules in order and takes the first that matches;
    the crawler rules are six at the head of the list and one catch-all near its end
    (``bot``, ``crawl``, ``spider``, ``silk``, ``WhatsApp``... anywhere in the first 100
    characters). The 600-odd rules between are only needed for a header the catch-all
    matches: they are what makes a Kindle's "Silk" browser or a "CUBOT" phone a device
    and not a crawler. Python's re holds them in a quarter of a MiB where Rust's engine
    takes over 20; they run only for headers a crawler rule matched, once each.
    """
    # Imported here, in the worker that checks.
    import ua_parser_rs

    devices = device_rules()
    last = max(index for index, (_, _, family) in enumerate(devices) if family == SPIDER)
    crawlers, earlier, before = [], [], []
    for regex, flag, family in devices[: last + 1]:
        if family == SPIDER:
            crawlers.append((regex, flag, str(len(earlier)), "", ""))
            earlier.append(tuple(before))
        else:
            before.append(re.compile(regex, re.IGNORECASE if flag == "i" else 0))
    extractor = ua_parser_rs.DeviceExtractor(crawlers)
    for sample in WARM_UP:
        match = extractor.extract(sample)
        if match is not None:
            any(rule.search(sample) for rule in earlier[int(match.family)])
    return extractor, earlier


class Bots:
    """Whether User-Agent headers are bots', each checked once and then read from the cache.

    A bot is what the whole parser would give the device family "Spider" (its
    crawlers, and the HTTP libraries it counts as crawlers, such as Python-urllib),
    or a browser driven by a program (a HEADLESS marker): the same verdict, for a
    fraction of the parser's memory and time (tests/test_enrich.py compares them on
    3,658 real user agents; they agreed on all 30,872 of uap-core's test cases too).
    """

    def __init__(self, cache_bytes: int = BOT_CACHE_BYTES) -> None:
        self.cache = BoundedCache(cache_bytes)
        # Built in the process that checks, as UserAgents' parser is (gunicorn.conf.py builds it in each worker).
        self._rules: CrawlerRules | None = None
        self._building = threading.Lock()

    def build(self) -> CrawlerRules:
        """The rules, built now if they are not yet (a tenth of a second)."""
        with self._building:
            if self._rules is None:
                self._rules = crawler_rules()
            return self._rules

    def __call__(self, header: str) -> bool:
        """Whether ``header`` (its first MAX_UA_CHARS characters) is a bot's."""
        text = header[:MAX_UA_CHARS]
        bot = self.cache.get(text)
        if bot is None:
            bot = self._check(text)
            self.cache.put(text, bot, sys.getsizeof(text) + BOT_ENTRY_OVERHEAD)
        return bot

    def _check(self, text: str) -> bool:
        """``text`` checked afresh."""
        if HEADLESS.search(text) is not None:
            return True
        crawlers, earlier = self._rules or self.build()
        match = crawlers.extract(text)
        return match is not None and not any(rule.search(text) for rule in earlier[int(match.family)])


class UserAgents:
    """The ``ua`` fields of User-Agent headers, parsed once each and then read from the cache."""

    def __init__(self, cache_bytes: int = CACHE_BYTES) -> None:
        self.cache = BoundedCache(cache_bytes)
        # Built on first use, in the process that parses: gunicorn's master only builds the app to
        # check the settings, and would otherwise hold the rules for nothing (gunicorn.conf.py builds
        # it in each worker before its first request).
        self._resolver: Callable[[str], Any] | None = None
        self._building = threading.Lock()

    def build(self) -> Callable[[str], Any]:
        """The parser, built now if it is not yet (half a second): a header's ua_parser result, all domains."""
        with self._building:
            if self._resolver is None:
                # Imported here, in the worker that parses: the engine and the rules take a worker from 41 to 68 MiB.
                from ua_parser import Domain, load_lazy_builtins
                from ua_parser.regex import Resolver

                resolver = Resolver(load_lazy_builtins())
                self._resolver = lambda text: resolver(text, Domain.ALL)
            return self._resolver

    def parse(self, header: str) -> dict[str, str]:
        """``header``'s fields: browser, browser_version when known, os, device."""
        text = header[:MAX_UA_CHARS]
        fields = self.cache.get(text)
        if fields is None:
            fields = self._parse(text)
            size = sys.getsizeof(text) + sum(sys.getsizeof(field) for field in fields.values()) + ENTRY_OVERHEAD
            self.cache.put(text, fields, size)
        return fields

    def _parse(self, text: str) -> dict[str, str]:
        """``text`` parsed afresh."""
        result = (self._resolver or self.build())(text)
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
        return fields
