"""Enrichment of event lines: anonymized addresses, visitor ids, parsed user agents and bots, excluded networks and
derived timestamps; as units, through the app, and through real gunicorn behind nginx."""

import hashlib
import hmac
import http.client
import os
import subprocess
import sys
import tracemalloc
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from analytics.enrich import BoundedCache, anonymize, visitor_hasher
from analytics.eventlog import render_lines
from analytics.lines import CONTEXT_ALLOWANCE
from analytics.peers import Sender
from analytics.useragent import (
    BOT_CACHE_BYTES,
    CACHE_BYTES,
    HEADLESS,
    MAX_FIELD_CHARS,
    MAX_UA_CHARS,
    Bots,
    UserAgents,
    device_rules,
)
from app import create_app
from config import SettingsError
from tests.harness.clients import OUTSIDER
from tests.harness.events import LONGEST_ADDRESS, LONGEST_REQUEST_ID, expanding_event
from tests.harness.gunicorn import ROOT, Server, logged, refusal, run_gunicorn
from tests.harness.lines import strict_json
from tests.harness.memory import MAX_HELD_KIB, memory_kib
from tests.harness.nginx import NGINX, Nginx, ipv6_loopback

SECRET = "enrich-test-secret-7f3a9c2e5b8d1f4a6c0e"
CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"
)
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
BINGBOT = (
    "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm) "
    "Chrome/116.0.1938.76 Safari/537.36"
)
HEADLESS_CHROME = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/131.0.6778.33 Safari/537.36"
)
GPTBOT = "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; GPTBot/1.2; +https://openai.com/gptbot)"
# Real user agents, most of them from uap-core's own tests: see the file's head.
CORPUS = ROOT / "tests" / "data" / "user_agents.txt"
# What the bot check may add to a worker: its rules, their engine, its cache full (4.5 MiB; the whole parser 27).
BOTS_MAX_KIB = 6 * 1024

# Real user agents: what the line says of each, and whether it is a bot.
USER_AGENTS = {
    "chrome": (
        CHROME,
        {"browser": "Chrome", "browser_version": "131.0.0.0", "os": "Windows", "device": "Other"},
        False,
    ),
    "safari": (
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 "
        "Safari/605.1.15",
        {"browser": "Safari", "browser_version": "18.1", "os": "Mac OS X", "device": "Mac"},
        False,
    ),
    "iphone": (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 "
        "Mobile/15E148 Safari/604.1",
        {"browser": "Mobile Safari", "browser_version": "18.1", "os": "iOS", "device": "iPhone"},
        False,
    ),
    "android": (
        "Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.6778.81 "
        "Mobile Safari/537.36",
        {"browser": "Chrome Mobile", "browser_version": "131.0.6778.81", "os": "Android", "device": "Samsung SM-S918B"},
        False,
    ),
    "firefox": (
        "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
        {"browser": "Firefox", "browser_version": "133.0", "os": "Linux", "device": "Other"},
        False,
    ),
    "googlebot": (
        GOOGLEBOT,
        {"browser": "Googlebot", "browser_version": "2.1", "os": "Other", "device": "Spider"},
        True,
    ),
    "googlebot smartphone": (
        "Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/131.0.6778.69 Mobile Safari/537.36 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
        {"browser": "Googlebot", "browser_version": "2.1", "os": "Android", "device": "Spider"},
        True,
    ),
    "bingbot": (BINGBOT, {"browser": "bingbot", "browser_version": "2.0", "os": "Other", "device": "Spider"}, True),
    "gptbot": (GPTBOT, {"browser": "GPTBot", "browser_version": "1.2", "os": "Other", "device": "Spider"}, True),
    "headless chrome": (
        HEADLESS_CHROME,
        {"browser": "HeadlessChrome", "browser_version": "131.0.6778", "os": "Linux", "device": "Other"},
        True,
    ),
    "phantomjs": (
        "Mozilla/5.0 (Windows NT 6.1; WOW64) AppleWebKit/538.1 (KHTML, like Gecko) PhantomJS/2.1.1 Safari/538.1",
        {"browser": "PhantomJS", "browser_version": "2.1.1", "os": "Windows", "device": "Other"},
        True,
    ),
    # HTTP libraries are how backends send their events: not bots, unless uap-core counts one as a crawler.
    "curl": ("curl/8.5.0", {"browser": "curl", "browser_version": "8.5.0", "os": "Other", "device": "Other"}, False),
    "python-requests": (
        "python-requests/2.32.3",
        {"browser": "Python Requests", "browser_version": "2.32", "os": "Other", "device": "Other"},
        False,
    ),
    "python-urllib": (
        "Python-urllib/3.11",
        {"browser": "Python-urllib", "browser_version": "3.11", "os": "Other", "device": "Spider"},
        True,
    ),
    "java": (
        "Java/17.0.12",
        {"browser": "Java", "browser_version": "17.0.12", "os": "Other", "device": "Spider"},
        True,
    ),
    # Crawler rules match these ("Silk", "CUBOT" holds "bot"), but the device rules that come first in uap-core win.
    "kindle": (
        "Mozilla/5.0 (Linux; U; Android 9; en-us; KFTRWI Build/PS7326.3183N) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Silk/131.2.1 like Chrome/131.0.6778.135 Safari/537.36",
        {"browser": "Amazon Silk", "browser_version": "131.2.1", "os": "Android", "device": "Kindle"},
        False,
    ),
    "cubot": (
        "Mozilla/5.0 (Linux; Android 13; CUBOT KINGKONG 9 Build/TP1A.220624.014) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/131.0.6778.81 Mobile Safari/537.36",
        {"browser": "Chrome Mobile", "browser_version": "131.0.6778.81", "os": "Android", "device": "KINGKONG 9"},
        False,
    ),
    "unknown": ("x", {"browser": "Other", "os": "Other", "device": "Other"}, False),
}

# User agents whose parsed fields copy what the client chose: long, quoted, with control characters.
HOSTILE_USER_AGENTS = [
    "Mozilla/5.0 (Linux; Android 14; "
    + "X" * 300
    + " Build/UP1A) AppleWebKit/537.36 Chrome/131.0.0.0 Mobile Safari/537",
    'Mozilla/5.0 (Linux; Android 14; \x85\x00"\\ab\u2028 Build/UP1A) AppleWebKit/537.36 Chrome/131.0.0.0 Mobile',
    "Mozilla/5.0 (Windows NT 10.0) AppleWebKit/537.36 Chrome/" + "9" * 300 + ".1.2.3 Safari/537.36",
    "Mozilla/5.0 (Linux; Android 14; " + '"\\' * 200 + " Build/UP1A) AppleWebKit/537.36 Chrome/131.0.0.0 Mobile",
]


# Units ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "anonymized"),
    [
        ("203.0.113.9", "203.0.113.0"),
        ("10.1.2.255", "10.1.2.0"),
        ("127.0.0.1", "127.0.0.0"),
        ("0.0.0.0", "0.0.0.0"),
        ("255.255.255.255", "255.255.255.0"),
        ("2001:db8:abcd:12:34:56:78:9a", "2001:db8:abcd::"),
        ("2001:db8:abcd:ffff:ffff:ffff:ffff:ffff", "2001:db8:abcd::"),
        ("2001:db8:abce::1", "2001:db8:abce::"),
        ("::1", "::"),
        ("fe80::1", "fe80::"),
        ("ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255", "ffff:ffff:ffff::"),
        # 6to4: 203.0.113.7 inside, cut to 203.0.113.0 as that address would be.
        ("2002:cb00:7107::1", "2002:cb00:7100::"),
        ("2002:cb00:71ff:ffff::1", "2002:cb00:7100::"),
        ("2003:cb00:7107::1", "2003:cb00:7107::"),
    ],
)
def test_anonymize(address, anonymized):
    """IPv4 addresses lose their last octet, IPv6 addresses everything after their first 48 bits (a 6to4 address
    after 40: its IPv4 address loses its last octet)."""
    assert anonymize(address) == anonymized


def test_bounded_cache_keeps_within_its_bytes_and_drops_the_oldest_first():
    """However many entries go in, the sizes kept add up to at most the bound; the oldest leave first."""
    cache = BoundedCache(max_bytes=1000)
    for number in range(100):
        cache.put(f"key{number}", number, size=30 + number % 7)
        assert cache.bytes <= 1000
    kept = [number for number in range(100) if cache.get(f"key{number}") is not None]
    assert kept == list(range(kept[0], 100)), "not the newest entries"
    assert cache.bytes == sum(30 + number % 7 for number in kept)
    # The newest entry it dropped would not have fitted beside those it kept.
    assert cache.bytes + 30 + (kept[0] - 1) % 7 > 1000, "it dropped more than it had to"


def test_bounded_cache_counts_each_key_once_and_refuses_what_cannot_fit():
    """Putting a key again changes nothing; an entry larger than the whole cache is not kept, and evicts nothing."""
    cache = BoundedCache(max_bytes=100)
    cache.put("a", 1, size=60)
    cache.put("a", 2, size=60)
    assert (cache.get("a"), cache.bytes, len(cache)) == (1, 60, 1)
    cache.put("huge", 3, size=101)
    assert (cache.get("huge"), cache.get("a"), cache.bytes) == (None, 1, 60)
    cache.put("b", 4, size=50)
    assert (cache.get("a"), cache.get("b"), cache.bytes) == (None, 4, 50)


@pytest.fixture(scope="module")
def user_agents() -> UserAgents:
    """One parser for the module: building it takes about half a second."""
    return UserAgents()


@pytest.fixture(scope="module")
def bots() -> Bots:
    """One bot check for the module."""
    return Bots()


@pytest.mark.parametrize("name", USER_AGENTS)
def test_user_agent_fields_and_bots(user_agents, bots, name):
    """Real browsers, crawlers, headless browsers and HTTP libraries: their fields, and which are bots."""
    header, fields, bot = USER_AGENTS[name]
    assert (user_agents.parse(header), bots(header)) == (fields, bot)
    # Read again from the caches: the same answer.
    assert (user_agents.parse(header), bots(header)) == (fields, bot)


def test_device_rules_are_those_ua_parser_loads():
    """The device rules read from ua-parser-builtins' text are, in order, those its module gives ua_parser."""
    from ua_parser_builtins.lazy import MATCHERS

    rules = device_rules()
    assert rules == [(matcher.regex, matcher.regex_flag, matcher.family) for matcher in MATCHERS[2]]


def test_bot_check_agrees_with_the_whole_parser(user_agents):
    """On 3,658 real user agents, the bot check (crawler rules only) says bot exactly when the whole parser gives the
    device family "Spider" or the header holds a headless marker: including the devices that a crawler rule matches
    but an earlier device rule claims (a Kindle's "Silk", a "CUBOT" phone, WhatsApp's and Yahoo's apps)."""
    headers = [line for line in CORPUS.read_text().splitlines() if not line.startswith("# ")]
    check = Bots()
    verdicts = {"bot": 0, "browser": 0}
    disagreements = []
    for header in headers:
        whole = user_agents.parse(header)["device"] == "Spider" or HEADLESS.search(header[:MAX_UA_CHARS]) is not None
        if check(header) != whole:
            disagreements.append(header)
        verdicts["bot" if whole else "browser"] += 1
    assert disagreements == []
    assert verdicts["bot"] > 900 and verdicts["browser"] > 2000, verdicts
    # The cases where the order of the rules decides: a crawler rule matches, a device rule before it too.
    crawlers, earlier = check.build()
    claimed = [h for h in headers if (m := crawlers.extract(h)) and any(r.search(h) for r in earlier[int(m.family)])]
    assert len(claimed) > 100
    assert not any(check(header) for header in claimed)


@pytest.mark.parametrize("header", HOSTILE_USER_AGENTS)
def test_parsed_fields_are_bounded_printable_ascii(user_agents, header):
    """Whatever the client puts in its user agent, each field is at most MAX_FIELD_CHARS of printable ASCII."""
    fields = user_agents.parse(header)
    assert set(fields) <= {"browser", "browser_version", "os", "device"}
    for value in fields.values():
        assert 0 < len(value) <= MAX_FIELD_CHARS
        assert all(" " <= char <= "~" for char in value), value
    if len(header) > 200:
        # The copied parts were long: the bound is what kept them short.
        assert any(len(value) == MAX_FIELD_CHARS for value in fields.values())
    else:
        # Control and line-break characters gone, quote and backslash kept (JSON escapes them).
        assert fields["device"] == '"\\ab'


def test_only_the_start_of_a_long_user_agent_counts(user_agents, bots):
    """A user agent is read up to MAX_UA_CHARS: padding after that changes nothing and makes no new cache entry."""
    before = len(user_agents.cache), len(bots.cache)
    first = GOOGLEBOT + " " * (MAX_UA_CHARS - len(GOOGLEBOT)) + "a" * 10_000
    second = GOOGLEBOT + " " * (MAX_UA_CHARS - len(GOOGLEBOT)) + "b" * 10_000
    assert user_agents.parse(first) == user_agents.parse(second) == USER_AGENTS["googlebot"][1]
    assert bots(first) is bots(second) is True
    assert (len(user_agents.cache), len(bots.cache)) == (before[0] + 1, before[1] + 1)


def test_user_agent_cache_is_bounded_in_real_bytes():
    """Thousands of distinct user agents of the longest length parsed: the cache holds at most CACHE_BYTES, counted
    by what Python really allocated for it (tracemalloc), not only by what it declares."""
    tracemalloc.start()
    try:
        parser = UserAgents()
        before = tracemalloc.get_traced_memory()[0]
        for number in range(6000):
            model = f"{number:06d}".ljust(60, "M")
            parser.parse(
                f"Mozilla/5.0 (Linux; Android 14; {model} Build/UP1A) Chrome/131.0.0.0 ".ljust(MAX_UA_CHARS, "z")
            )
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert parser.cache.bytes <= CACHE_BYTES
    assert 1000 < len(parser.cache) < 6000, "the cache either kept everything or almost nothing"
    # What the parsing engine allocates itself is native memory, which tracemalloc does not see.
    assert held <= CACHE_BYTES * 1.1, f"{held} bytes held for a cache of {parser.cache.bytes} declared"


def test_bot_cache_is_bounded_in_real_bytes():
    """Thousands of distinct user agents of the longest length checked: the bot check's cache holds at most
    BOT_CACHE_BYTES, counted by what Python really allocated for it."""
    check = Bots()
    check.build()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for number in range(3000):
            check(f"Mozilla/5.0 (compatible; Examplebot/{number}; +https://bot.example) ".ljust(MAX_UA_CHARS, "z"))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert check.cache.bytes <= BOT_CACHE_BYTES
    assert 500 < len(check.cache) < 3000, "the cache either kept everything or almost nothing"
    assert held <= BOT_CACHE_BYTES * 1.1, f"{held} bytes held for a cache of {check.cache.bytes} declared"


def test_visitor_id_is_the_truncated_hmac_of_day_address_agent_and_site():
    """The id is the first 64 bits of HMAC-SHA256(secret, day, address, user agent, host, origin): the same within a
    day for the same inputs, different when any of them changes."""
    visitor_id = visitor_hasher(SECRET)
    noon = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    sender = Sender("id-1", "203.0.113.9", CHROME, "analytics.example", "https://shop.example")
    message = "2026-11-27\n203.0.113.9\n" + CHROME + "\nanalytics.example\nhttps://shop.example"
    expected = hmac.new(SECRET.encode(), message.encode(), hashlib.sha256).hexdigest()[:16]
    assert visitor_id(noon, sender) == expected
    # Another request of the same visitor, later that day: the same id (the request id is not part of it).
    assert visitor_id(noon + timedelta(hours=11, minutes=59), replace(sender, request_id="id-2")) == expected
    others = [
        visitor_id(noon + timedelta(hours=12), sender),
        visitor_id(noon, Sender("id-1", "203.0.113.10", CHROME, "analytics.example", "https://shop.example")),
        visitor_id(noon, Sender("id-1", "203.0.113.9", GOOGLEBOT, "analytics.example", "https://shop.example")),
        visitor_id(noon, Sender("id-1", "203.0.113.9", CHROME, "other.example", "https://shop.example")),
        visitor_id(noon, Sender("id-1", "203.0.113.9", CHROME, "analytics.example", "https://blog.example")),
        visitor_hasher(SECRET + "x")(noon, sender),
    ]
    assert len({expected, *others}) == 7


def test_visitor_ids_from_a_small_cache_are_the_hmac():
    """With a cache far too small for the visitors seen, every id is still the HMAC of its own inputs, the first
    time and when asked again (from the cache or computed afresh)."""
    visitor_id = visitor_hasher(SECRET, cache_bytes=2000)
    noon = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    senders = [Sender("id", f"203.0.113.{n}", f"{CHROME} {n}", "analytics.example", "") for n in range(40)]
    for _ in range(2):
        for sender in senders:
            message = f"2026-11-27\n{sender.client_ip}\n{sender.user_agent}\nanalytics.example\n".encode()
            assert visitor_id(noon, sender) == hmac.new(SECRET.encode(), message, hashlib.sha256).hexdigest()[:16]


def test_enriched_line_fits_the_allowance():
    """Every field at its longest, rendered as lines are: what a line adds to the event as sent stays within
    CONTEXT_ALLOWANCE. Each field's longest form is bounded by construction (tests above and in test_peers)."""
    stamp = datetime(2026, 11, 27, 12, 0, 0, 123456, tzinfo=UTC)
    longest_ua = {name: '"' * MAX_FIELD_CHARS for name in ("browser", "browser_version", "os", "device")}
    context = {
        "batch_timestamp": stamp,
        "received_at": stamp,
        "request_id": LONGEST_REQUEST_ID,
        "client_ip": LONGEST_ADDRESS,
        "visitor_id": "f" * 16,
        "ua": longest_ua,
        "bot": False,
    }
    sent = b'{"type":"a","timestamp":0.5}'
    event = {"type": "a", "timestamp": stamp, "derived_timestamp": stamp}
    (batch,), _ = render_lines(None, "info", {"events": [event], **context})
    added = len(batch.text) - len(b"\n") - len(sent)
    assert added <= CONTEXT_ALLOWANCE
    print(f"an enriched line adds at most {added} bytes to its event")


# Through the app ------------------------------------------------------------------------------------------------


def lines_of(capfd: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    """The event lines written since the last call."""
    return [strict_json(line) for line in capfd.readouterr().out.splitlines()]


def app_post(settings: dict[str, Any], body: Any, headers: dict[str, str] | None = None) -> Any:
    """POST ``body`` to an app with ``settings``, from 127.0.0.1 (a trusted proxy by default)."""
    client = create_app({"TESTING": True, **settings}).test_client()
    return client.post(
        "/api/analytics", data=orjson.dumps(body), headers=headers or {}, environ_base={"REMOTE_ADDR": "127.0.0.1"}
    )


def test_enriched_lines_stay_within_the_limit_with_hostile_input(capfd):
    """Events at every size up to MAX_EVENT_BYTES, made to grow when written, from a client with the longest
    request id and address and a user agent made to give the longest fields: no line is longer than
    MAX_EVENT_BYTES + CONTEXT_ALLOWANCE with every enrichment on."""
    settings = {"MAX_EVENT_BYTES": 9000, "CLIENT_IP": "full", "PARSE_USER_AGENT": True, "VISITOR_ID_SECRET": SECRET}
    events = [orjson.loads(expanding_event("next_line", size)) for size in range(500, 9001, 500)]
    headers = {
        "X-Request-ID": LONGEST_REQUEST_ID,
        "X-Forwarded-For": LONGEST_ADDRESS,
        "User-Agent": HOSTILE_USER_AGENTS[-1],
    }
    response = app_post(settings, {"timestamp": 1.5, "events": events}, headers)
    assert response.status_code == 200, response.json
    out = capfd.readouterr().out.encode().splitlines()
    assert len(out) == response.json["received"] > 0
    for raw in out:
        line = orjson.loads(raw)
        assert {"ua", "visitor_id", "derived_timestamp"} <= set(line)
        assert len(raw) <= 9000 + CONTEXT_ALLOWANCE


@pytest.mark.parametrize(
    ("setting", "forwarded", "written"),
    [
        ("anonymized", "203.0.113.9", "203.0.113.0"),
        ("anonymized", "2001:db8:abcd:12::7", "2001:db8:abcd::"),
        ("full", "203.0.113.9", "203.0.113.9"),
        ("full", "2001:db8:abcd:12::7", "2001:db8:abcd:12::7"),
        ("none", "203.0.113.9", None),
    ],
)
def test_client_ip_settings(capfd, setting, forwarded, written):
    """CLIENT_IP anonymized (the default), full or none, for IPv4 and IPv6 clients behind a trusted proxy."""
    response = app_post({"CLIENT_IP": setting}, {"events": [{"type": "a"}]}, {"X-Forwarded-For": forwarded})
    assert (response.status_code, response.json) == (200, {"success": True, "received": 1})
    (line,) = lines_of(capfd)
    assert line.get("client_ip") == written
    assert ("client_ip" in line) == (written is not None)


@pytest.mark.parametrize(("agent", "bot"), [(GOOGLEBOT, True), (CHROME, False)], ids=["crawler", "browser"])
def test_default_lines_flag_bots_only(capfd, agent, bot):
    """With the defaults, a line has the anonymized address and the derived timestamp, ``bot: true`` if a bot sent
    it (and no bot field otherwise), and none of the fields whose settings are off: no ua, no visitor_id."""
    body = {"timestamp": "2024-05-20T14:32:05Z", "events": [{"type": "a", "timestamp": "2024-05-20T14:32:00Z"}]}
    response = app_post({}, body, {"User-Agent": agent})
    assert (response.status_code, response.json) == (200, {"success": True, "received": 1})
    (line,) = lines_of(capfd)
    fields = ["kind", "type", "timestamp", "derived_timestamp", "batch_timestamp", "received_at", "request_id"]
    assert list(line) == [*fields, "client_ip", "bot"] if bot else [*fields, "client_ip"]
    assert line.get("bot") is (True if bot else None)


@pytest.mark.parametrize(
    ("settings", "imported", "built"),
    [
        ({"BOTS": "off"}, [], []),
        ({}, ["analytics.useragent"], ["analytics.useragent", "ua_parser_rs"]),
        ({"PARSE_USER_AGENT": True}, ["analytics.useragent"], ["analytics.useragent", "ua_parser", "ua_parser_rs"]),
    ],
    ids=["bots off", "defaults", "parsing"],
)
def test_user_agent_modules_load_only_when_used(settings, imported, built):
    """With BOTS off and PARSE_USER_AGENT off nothing of user agents is imported, even once a worker builds what
    enrichment needs; with the defaults the engine is imported by that build (each worker's, before it serves),
    never by building the app (as gunicorn's master does), and ua_parser itself only to parse."""
    names = ("analytics.useragent", "ua_parser", "ua_parser_rs")
    code = (
        "import sys; from app import create_app; "
        f"app = create_app({{'TESTING': True, **{settings!r}}}); "
        f"print(sorted(name for name in sys.modules if name in {names!r})); "
        "app.extensions['ingestor'].enricher.build(); "
        f"print(sorted(name for name in sys.modules if name in {names!r}))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (0, f"{imported}\n{built}\n"), result.stderr


def iso(value: str) -> datetime:
    """A line's timestamp as an aware datetime."""
    return datetime.fromisoformat(value)


def test_derived_timestamp(capfd):
    """derived_timestamp is the event's time plus received_at minus the batch's timestamp, written as the other
    times are; events without a timestamp, and events whose correction leaves the calendar, get none."""
    body = {
        "timestamp": "2024-05-20T14:32:05.250Z",
        "events": [
            {"type": "a", "id": "one", "timestamp": "2024-05-20T14:32:00Z"},
            {"type": "a", "id": "none"},
            {"type": "a", "id": "ms", "timestamp": 1716215520000},
            {"type": "a", "id": "edge", "timestamp": "9999-12-31T23:59:59Z"},
        ],
    }
    response = app_post({}, body)
    assert (response.status_code, response.json) == (200, {"success": True, "received": 4})
    lines = {line["id"]: line for line in lines_of(capfd)}
    offset = iso(lines["one"]["received_at"]) - iso("2024-05-20T14:32:05.250Z")
    assert iso(lines["one"]["derived_timestamp"]) == iso("2024-05-20T14:32:00Z") + offset
    assert lines["one"]["derived_timestamp"].endswith("Z")
    assert iso(lines["ms"]["derived_timestamp"]) == iso("2024-05-20T14:32:00Z") + offset
    assert "derived_timestamp" not in lines["none"]
    # The batch was sent in 2024 and received now: 9999-12-31 plus that is past the calendar's end.
    assert "derived_timestamp" not in lines["edge"]
    assert lines["edge"]["timestamp"] == "9999-12-31T23:59:59Z"


@pytest.mark.parametrize(
    ("settings", "body"),
    [
        (
            {"DERIVED_TIMESTAMP": False},
            {"timestamp": "2024-05-20T14:32:05Z", "events": [{"type": "a", "timestamp": 5}]},
        ),
        ({}, {"events": [{"type": "a", "timestamp": "2024-05-20T14:32:00Z"}]}),
    ],
    ids=["setting off", "no batch timestamp"],
)
def test_no_derived_timestamp(capfd, settings, body):
    """Without DERIVED_TIMESTAMP, or without a batch timestamp to measure the clock by, no derived_timestamp."""
    response = app_post(settings, body)
    assert (response.status_code, response.json) == (200, {"success": True, "received": 1})
    (line,) = lines_of(capfd)
    assert "timestamp" in line and "derived_timestamp" not in line


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"LOG_CLIENT_IP": False}, "LOG_CLIENT_IP is no longer read: set CLIENT_IP to anonymized (the default)"),
        ({"CLIENT_IP": "partial"}, "CLIENT_IP must be anonymized, full or none, not 'partial'"),
        ({"CLIENT_IP": True}, "CLIENT_IP must be anonymized, full or none, not True"),
        ({"VISITOR_ID_SECRET": "short-secret"}, "VISITOR_ID_SECRET must be empty (no visitor_id) or at least 32"),
        ({"VISITOR_ID_SECRET": 12345678901234567890123456789012345}, "VISITOR_ID_SECRET must be text, not read as int"),
        ({"PARSE_USER_AGENT": "yes"}, "PARSE_USER_AGENT must be true or false, not 'yes'"),
        ({"DERIVED_TIMESTAMP": 1}, "DERIVED_TIMESTAMP must be true or false, not 1"),
        ({"BOTS": "block"}, "BOTS must be keep, drop or off, not 'block'"),
        ({"EXCLUDE_IPS": "10.0.0.0/8,office"}, "EXCLUDE_IPS: 'office' is not an address or a CIDR network"),
        ({"EXCLUDE_IPS": [10]}, "EXCLUDE_IPS must be a list of strings"),
    ],
)
def test_bad_enrichment_settings_stop_the_app(settings, message):
    """Each bad value stops the start with one line naming the setting; a secret's value is never in it."""
    with pytest.raises(SettingsError) as error:
        create_app({"TESTING": True, **settings})
    assert message in str(error.value)
    assert "\n" not in str(error.value)
    assert "short-secret" not in str(error.value) and "1234567890" not in str(error.value)


# Through real gunicorn, behind nginx ----------------------------------------------------------------------------

ENRICHED = {
    "ANALYTICS_PARSE_USER_AGENT": "true",
    "ANALYTICS_VISITOR_ID_SECRET": SECRET,
    "ANALYTICS_EXCLUDE_IPS": "198.51.100.0/24,2001:db8:ffff::/48",
}
# The address nginx's requests come from; the service trusts it as a proxy by default.
PROXY = "127.0.0.1"


def post(
    port: int, body: Any, headers: dict[str, str] | None = None, host: str = "127.0.0.1", source: str | None = None
) -> tuple[int, Any]:
    """POST ``body`` as JSON on a connection of its own (from ``source`` if given); the status and the JSON answer."""
    connection = http.client.HTTPConnection(host, port, timeout=30, source_address=(source, 0) if source else None)
    try:
        head = {"Content-Type": "application/json", "Connection": "close", **(headers or {})}
        connection.request("POST", "/api/analytics", orjson.dumps(body), head)
        response = connection.getresponse()
        return response.status, strict_json(response.read())
    finally:
        connection.close()


def expected_visitor_id(line: dict[str, Any], address: str, user_agent: str, host: str, origin: str = "") -> str:
    """The visitor id the service should have written on ``line``, worked out here from what the request carried."""
    day = line["received_at"][:10]
    message = "\n".join((day, address, user_agent, host, origin)).encode()
    return hmac.new(SECRET.encode(), message, hashlib.sha256).hexdigest()[:16]


def batch(event_id: str, count: int = 1) -> dict[str, Any]:
    """A batch sent an hour late by the client's clock, of ``count`` events that happened 10 s before it was sent."""
    sent = datetime.now(UTC) - timedelta(hours=1)
    event_time = (sent - timedelta(seconds=10)).isoformat()
    return {
        "timestamp": sent.isoformat(),
        "events": [{"type": "e", "id": f"{event_id}-{n}", "timestamp": event_time} for n in range(count)],
    }


@pytest.fixture(scope="module")
def enriched(start_module_server: Callable[..., Server]) -> Server:
    """gunicorn (2 workers) with every enrichment on: user agents parsed, visitor ids, two excluded networks."""
    return start_module_server(workers=2, env=ENRICHED)


@pytest.fixture(scope="module")
def behind_nginx(enriched: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    """deploy/nginx.conf in front of the enriched gunicorn."""
    if not os.access(NGINX, os.X_OK):
        pytest.skip(f"nginx is not installed ({NGINX}); apt-get install nginx")
    nginx = Nginx(tmp_path_factory.mktemp("nginx"), enriched.port).start()
    yield nginx
    nginx.stop()


def test_user_agents_behind_nginx(enriched, behind_nginx):
    """Browsers, crawlers and headless browsers through nginx from an IPv4 client: each line has the parsed user
    agent, its bot flag, the anonymized address, the visitor id of the whole address, and the derived timestamp."""
    for name, (header, _, _) in USER_AGENTS.items():
        status, answer = post(behind_nginx.port, batch(f"ua-{name}"), {"User-Agent": header}, source=OUTSIDER)
        assert (status, answer) == (200, {"success": True, "received": 1}), name
    for name, (header, fields, bot) in USER_AGENTS.items():
        line = logged(enriched, f"ua-{name}-0")
        assert (line["ua"], line.get("bot"), line["client_ip"]) == (fields, True if bot else None, "127.0.0.0"), name
        # nginx passes the Host it was sent, without the port ($host).
        assert line["visitor_id"] == expected_visitor_id(line, OUTSIDER, header, "127.0.0.1"), name
        corrected = iso(line["timestamp"]) + (iso(line["received_at"]) - iso(line["batch_timestamp"]))
        assert iso(line["derived_timestamp"]) == corrected
        assert iso(line["received_at"]) - iso(line["derived_timestamp"]) == timedelta(seconds=10)


def test_ipv6_client_behind_nginx(enriched, behind_nginx):
    """An IPv6 client of nginx: the line has its address cut to the /48, its visitor id is of the whole address."""
    if not ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    status, answer = post(behind_nginx.port, batch("v6-nginx"), {"User-Agent": CHROME}, host="::1")
    assert (status, answer) == (200, {"success": True, "received": 1})
    line = logged(enriched, "v6-nginx-0")
    assert line["client_ip"] == "::"
    # The Host header names an IPv6 address in brackets; nginx's $host keeps them.
    assert line["visitor_id"] == expected_visitor_id(line, "::1", CHROME, "[::1]")


def test_ipv6_client_forwarded_by_a_trusted_proxy(enriched):
    """An IPv6 address in X-Forwarded-For from a trusted proxy is the client's: anonymized to its /48."""
    headers = {"User-Agent": CHROME, "X-Forwarded-For": "2001:db8:abcd:12::7", "Origin": "https://shop.example"}
    status, answer = post(enriched.port, batch("v6-proxy"), headers)
    assert (status, answer) == (200, {"success": True, "received": 1})
    line = logged(enriched, "v6-proxy-0")
    assert line["client_ip"] == "2001:db8:abcd::"
    host = f"127.0.0.1:{enriched.port}"
    assert line["visitor_id"] == expected_visitor_id(line, "2001:db8:abcd:12::7", CHROME, host, "https://shop.example")


def test_one_visitor_id_per_visitor_and_site(enriched):
    """Two requests of one browser from one address share a visitor id; another browser, address or site does not."""
    variants = {
        "same-a": {"User-Agent": CHROME, "X-Forwarded-For": "203.0.113.9"},
        "same-b": {"User-Agent": CHROME, "X-Forwarded-For": "203.0.113.9"},
        # The same /24: one address on the line, two visitors.
        "neighbour": {"User-Agent": CHROME, "X-Forwarded-For": "203.0.113.10"},
        "browser": {"User-Agent": USER_AGENTS["firefox"][0], "X-Forwarded-For": "203.0.113.9"},
        "site": {"User-Agent": CHROME, "X-Forwarded-For": "203.0.113.9", "Origin": "https://blog.example"},
    }
    for tag, headers in variants.items():
        assert post(enriched.port, batch(f"visitor-{tag}"), headers) == (200, {"success": True, "received": 1})
    lines = {tag: logged(enriched, f"visitor-{tag}-0") for tag in variants}
    assert lines["same-a"]["visitor_id"] == lines["same-b"]["visitor_id"]
    assert lines["same-a"]["client_ip"] == lines["neighbour"]["client_ip"] == "203.0.113.0"
    assert len({lines[tag]["visitor_id"] for tag in ("same-a", "neighbour", "browser", "site")}) == 4


def test_excluded_networks_are_answered_and_not_written(enriched):
    """Requests from EXCLUDE_IPS (IPv4 and IPv6) get the answer any client gets, invalid events listed, and write
    nothing; a neighbouring address outside them is written."""
    mixed = {"events": [{"type": "a", "id": "ok"}, {"type": ""}, {"type": "b"}]}
    usual = {
        "success": True,
        "received": 2,
        "rejected": [{"index": 1, "errors": {"type": ["Length must be between 1 and 256."]}}],
    }
    start = enriched.fence()
    for address in ("198.51.100.7", "2001:db8:ffff:1::1", "198.51.101.7"):
        headers = {"User-Agent": CHROME, "X-Forwarded-For": address}
        assert post(enriched.port, mixed, headers) == (200, usual), address
    lines = enriched.lines_since(start)
    assert [(line["type"], line["client_ip"]) for line in lines] == [("a", "198.51.101.0"), ("b", "198.51.101.0")]


def test_no_user_agent_is_no_bot(enriched):
    """A request without a User-Agent (a backend's, say) is written with neither bot nor ua."""
    status, answer = post(enriched.port, batch("no-ua"))
    assert (status, answer) == (200, {"success": True, "received": 1})
    line = logged(enriched, "no-ua-0")
    assert "bot" not in line and "ua" not in line


def test_the_secret_is_never_written(enriched):
    """After all the requests of this module, the visitor id secret is in none of the server's output."""
    assert post(enriched.port, batch("last"), {"User-Agent": CHROME}) == (200, {"success": True, "received": 1})
    logged(enriched, "last-0")
    assert SECRET.encode() not in bytes(enriched.stdout)
    assert SECRET not in enriched.stderr_path.read_text()


def dropped_events(server: Server) -> dict[str, float]:
    """analytics_events_dropped by reason, as GET /metrics says."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    (family,) = [family for family in text_string_to_metric_families(text) if family.name == "analytics_events_dropped"]
    return {sample.labels["reason"]: sample.value for sample in family.samples if sample.name.endswith("_total")}


def test_bots_flagged_by_default(start_server):
    """With the default settings, lines of crawlers, headless browsers and the HTTP libraries uap-core counts as
    crawlers say ``bot: true``; browsers' and other HTTP libraries' lines have no bot field; none has ua."""
    server = start_server(workers=2)
    names = [name for name in USER_AGENTS if name != "unknown"]
    start = server.fence()
    for name in names:
        status, answer = post(
            server.port, {"events": [{"type": "e", "id": name}]}, {"User-Agent": USER_AGENTS[name][0]}
        )
        assert (status, answer) == (200, {"success": True, "received": 1}), name
    lines = {line["id"]: line for line in server.lines_since(start)}
    assert {name: lines[name].get("bot") for name in names} == {
        name: True if USER_AGENTS[name][2] else None for name in names
    }
    assert not [line for line in lines.values() if "ua" in line]


def worker_memory_kib(server: Server, agents: list[str]) -> int:
    """The resident memory of ``server``'s one worker once it has answered a request from each of ``agents``."""
    for agent in agents:
        assert post(server.port, {"events": [{"type": "m"}]}, {"User-Agent": agent})[0] == 200
    (worker,) = server.worker_pids()
    return memory_kib(worker)["VmRSS"]


def test_bot_check_memory(start_server):
    """A worker with the bot check (the default), having checked 3,658 real user agents, holds at most BOTS_MAX_KIB
    more than one with BOTS=off that answered the same requests, and stays within the memory test's bound."""
    agents = [line for line in CORPUS.read_text().splitlines() if not line.startswith("# ")]
    held = {
        setting: worker_memory_kib(start_server(workers=1, env={"ANALYTICS_BOTS": setting}), agents)
        for setting in ("off", "keep")
    }
    added = held["keep"] - held["off"]
    print(f"worker: {held['off']} KiB with BOTS=off, {held['keep']} KiB with the bot check: {added} KiB more")
    assert added <= BOTS_MAX_KIB
    assert held["keep"] < MAX_HELD_KIB


def test_bots_dropped(start_server):
    """BOTS=drop, without PARSE_USER_AGENT: crawlers and headless browsers get the answer a browser gets and write
    nothing; the dropped events are counted by reason, as are those from EXCLUDE_IPS. Browsers and HTTP libraries
    that are not crawlers are written, whole address and all."""
    server = start_server(
        workers=1,
        env={
            "ANALYTICS_BOTS": "drop",
            "ANALYTICS_CLIENT_IP": "full",
            "ANALYTICS_EXCLUDE_IPS": "198.51.100.0/24",
        },
    )
    mixed = {"events": [{"type": "a"}, {"type": ""}, {"type": "b"}]}
    usual = (
        200,
        {
            "success": True,
            "received": 2,
            "rejected": [{"index": 1, "errors": {"type": ["Length must be between 1 and 256."]}}],
        },
    )
    for agent in (GOOGLEBOT, BINGBOT, HEADLESS_CHROME, GPTBOT, CHROME, "curl/8.5.0"):
        assert post(server.port, mixed, {"User-Agent": agent, "X-Forwarded-For": "203.0.113.9"}) == usual, agent
    assert post(server.port, mixed, {"User-Agent": CHROME, "X-Forwarded-For": "198.51.100.1"}) == usual
    dropped = dropped_events(server)
    # Read whole once gunicorn has stopped (no fence here: the harness's fence is sent by Python-urllib, a bot).
    server.stop()
    lines = server.lines()
    assert [(line["type"], line["client_ip"], "bot" in line or "ua" in line) for line in lines] == [
        ("a", "203.0.113.9", False),
        ("b", "203.0.113.9", False),
        ("a", "203.0.113.9", False),
        ("b", "203.0.113.9", False),
    ]
    assert (dropped["bot"], dropped["excluded"]) == (8, 2)


def test_enrichment_off(start_server):
    """CLIENT_IP none, DERIVED_TIMESTAMP false and BOTS off, the other enrichments at their defaults (off): a line has
    none of the enrichment fields, a crawler's neither, and an address that another setup excludes is written."""
    env = {"ANALYTICS_CLIENT_IP": "none", "ANALYTICS_DERIVED_TIMESTAMP": "false", "ANALYTICS_BOTS": "off"}
    server = start_server(workers=1, env=env)
    headers = {"User-Agent": GOOGLEBOT, "X-Forwarded-For": "198.51.100.7"}
    assert post(server.port, batch("off"), headers) == (200, {"success": True, "received": 1})
    line = logged(server, "off-0")
    assert list(line) == ["kind", "type", "id", "timestamp", "batch_timestamp", "received_at", "request_id"]


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("ANALYTICS_LOG_CLIENT_IP", "false", "LOG_CLIENT_IP is no longer read: set CLIENT_IP"),
        ("ANALYTICS_CLIENT_IP", "partial", "CLIENT_IP must be anonymized, full or none, not 'partial'"),
        ("ANALYTICS_VISITOR_ID_SECRET", "not-long-enough", "VISITOR_ID_SECRET must be empty (no visitor_id) or"),
        ("ANALYTICS_BOTS", "flag", "BOTS must be keep, drop or off, not 'flag'"),
        ("ANALYTICS_EXCLUDE_IPS", "10.0.0.0/8,office", "EXCLUDE_IPS: 'office' is not an address or a CIDR network"),
    ],
)
def test_bad_setting_stops_gunicorn_with_one_line(variable, value, named):
    """Under gunicorn with four workers, each bad enrichment setting is one line naming it, and no secret."""
    result = run_gunicorn({variable: value})
    assert named in refusal(result)
    assert "not-long-enough" not in result.stderr
