"""analytics.js in a real headless Chromium against real gunicorn, on loopback.

Pages under test come from a second origin (a small server of this module) and
load the script from the service's origin, as a site would; /demo loads it from
its own origin. Event lines are read from gunicorn's stdout. Test knobs (short
flush intervals and retry waits) are the script's own data- attributes.
"""

import base64
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, Request, Route, sync_playwright

from analytics.client import SCRIPT_PATH
from tests.harness.gunicorn import ROOT, Server

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"
)

# As root on a machine with no outside network: no sandbox, and no background connections to Google.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts"
PAGE_TEMPLATE = (Path(__file__).parent / "browser" / "page.html").read_text()
UNSENT_PREFIX = "analytics:unsent:"
# The client's caps on failed tries of an event: with no answer it can read (status 0), and in all.
MAX_TRIES_UNANSWERED = 6
MAX_TRIES = 20

# Records every navigator.sendBeacon call in sessionStorage, which outlives the page that made it.
SPY_BEACONS = """
const realBeacon = navigator.sendBeacon.bind(navigator);
navigator.sendBeacon = (url, data) => {
  const queued = realBeacon(url, data);
  const calls = JSON.parse(sessionStorage.getItem('test:beacons') || '[]');
  sessionStorage.setItem('test:beacons', JSON.stringify([...calls, {url, data, queued}]));
  return queued;
};
"""
# The browser signals Global Privacy Control, or Do Not Track.
GPC = "Object.defineProperty(Navigator.prototype, 'globalPrivacyControl', {get: () => true, configurable: true});"
DNT = "Object.defineProperty(Navigator.prototype, 'doNotTrack', {get: () => '1', configurable: true});"
# Every way to send is counted.
SPY_SENDS = """
window.sends = [];
const realFetch = window.fetch.bind(window);
window.fetch = (...args) => { window.sends.push(['fetch', String(args[0])]); return realFetch(...args); };
const realSendBeacon = navigator.sendBeacon.bind(navigator);
navigator.sendBeacon = (...args) => { window.sends.push(['beacon', String(args[0])]); return realSendBeacon(...args); };
"""
# Counts in window.settled the fetches whose answer, or failure, the page has seen. The client's await
# resumes in the same microtask run as this callback, before any other task: once the count is up, the
# client has acted on that answer.
COUNT_SETTLED = """
window.settled = 0;
const fetchToCount = window.fetch.bind(window);
window.fetch = (...args) => fetchToCount(...args).finally(() => { window.settled += 1; });
"""


class Site:
    """A second origin on loopback serving the test page, whose script tag the test sets."""

    def __init__(self) -> None:
        self.script_tag = ""
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                """The test page with the current tag, a blank page, or 404."""
                path = self.path.split("?")[0]
                if path == "/page.html":
                    body = PAGE_TEMPLATE.replace("{script}", site.script_tag)
                elif path == "/blank.html":
                    body = "<!doctype html><title>elsewhere</title><p>Another page of the site.</p>"
                else:
                    self.send_error(404)
                    return
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: pytest's output is for the tests."""

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def page_url(self, src: str, **attributes: Any) -> str:
        """The test page's URL, its tag loading ``src`` with ``attributes`` as data- attributes."""
        attrs = "".join(
            f" data-{name.replace('_', '-')}" + ("" if value is True else f'="{value}"')
            for name, value in attributes.items()
        )
        self.script_tag = f'<script src="{src}"{attrs}></script>'
        return self.url + "/page.html"

    def close(self) -> None:
        """Stop serving."""
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass
class Tab:
    """A page in its own browser context, with what it sent to the API and what it said on the console."""

    page: Page
    api_requests: list[Request] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def until(self, condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
        """Let the browser run until ``condition()`` holds; fail, naming ``what``, after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}")
            # Playwright's callbacks (routes, request events) run only while the page is being waited on.
            self.page.wait_for_timeout(20)

    def lines(self, server: Server, count: int) -> list[dict[str, Any]]:
        """The server's event lines, once there are at least ``count``."""
        self.until(lambda: server.stdout.count(b"\n") >= count, f"{count} event lines on stdout")
        return server.lines()

    def stored_unsent(self) -> list[str]:
        """The localStorage keys holding unsent events on the page's origin."""
        return self.page.evaluate(f"Object.keys(localStorage).filter(k => k.startsWith('{UNSENT_PREFIX}'))")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium for the module."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    """The second origin that serves the test page."""
    site = Site()
    yield site
    site.close()


@pytest.fixture
def tab(browser: Browser) -> Iterator[Tab]:
    """A fresh context (its own storage) and page; the page must raise no script error."""
    context = browser.new_context()
    tab = Tab(context.new_page())
    tab.page.on("request", lambda r: tab.api_requests.append(r) if "/api/analytics" in r.url else None)
    tab.page.on("console", lambda m: tab.warnings.append(m.text) if m.type == "warning" else None)
    tab.page.on("pageerror", lambda e: tab.errors.append(str(e)))
    yield tab
    context.close()
    assert tab.errors == []


def event_ids(request_body: str | None) -> list[str]:
    """The event ids in a batch body the client sent."""
    return [event["id"] for event in json.loads(request_body or "{}")["events"]]


RouteHandler = Callable[[Route], None]


def answer_first(count: int, status: int, body: str, **headers: str) -> tuple[RouteHandler, list[str | None]]:
    """A route handler that answers the first ``count`` batches itself (readable cross-origin) and lets the
    rest through to the service; and the list of the request bodies it saw, filled as they come."""
    tries: list[str | None] = []

    def handler(route: Route) -> None:
        tries.append(route.request.post_data)
        if len(tries) <= count:
            route.fulfill(
                status=status,
                headers={"Access-Control-Allow-Origin": "*", **headers},
                content_type="application/json",
                body=body,
            )
        else:
            route.continue_()

    return handler, tries


def test_tracked_events_arrive_in_one_batch_with_their_ids(start_server: Callable[..., Server], site: Site, tab: Tab):
    """A few events, from a page on another origin, reach the log in one batch, each with its id."""
    server = start_server(workers=2)
    tab.page.goto(site.page_url(f"{server.url}/analytics.js", flush_interval=200))
    ids = tab.page.evaluate(
        """[analytics.track('signup_click', {plan: 'pro'}),
            analytics.track('add_to_cart', {sku: 'BOOK-42', price: 19.5}),
            analytics.track('search_query', {query: 'rate limiting'})]"""
    )
    lines = tab.lines(server, 3)
    assert [line["id"] for line in lines] == ids
    assert [line["type"] for line in lines] == ["signup_click", "add_to_cart", "search_query"]
    assert [line["payload"] for line in lines] == [
        {"plan": "pro"},
        {"sku": "BOOK-42", "price": 19.5},
        {"query": "rate limiting"},
    ]
    assert len({line["request_id"] for line in lines}) == 1
    session_id = tab.page.evaluate("sessionStorage.getItem('analytics:session')")
    assert {line["sessionId"] for line in lines} == {session_id}
    assert all(line["timestamp"] <= line["batch_timestamp"] for line in lines)
    # One request, to the script's own origin, as a simple (preflight-free) text/plain POST.
    assert [(r.method, r.url) for r in tab.api_requests] == [("POST", f"{server.url}/api/analytics")]
    assert tab.api_requests[0].headers["content-type"].startswith("text/plain")
    assert event_ids(tab.api_requests[0].post_data) == ids


def test_a_flush_asked_for_while_a_batch_is_in_flight_goes_once_it_is_answered(
    start_server: Callable[..., Server], site: Site, tab: Tab
):
    """One batch is in flight at a time: a flush asked for meanwhile sends the next batch as soon as the first is
    answered, not at the next timer (an hour away here)."""
    server = start_server(workers=2)
    endpoint = f"{server.url}/api/analytics"
    held: list[Route] = []
    tab.page.route(endpoint, lambda route: held.append(route) if not held else route.continue_())
    tab.page.goto(site.page_url(f"{server.url}/analytics.js", flush_interval=3600000))
    first = tab.page.evaluate("const ids = [analytics.track('first')]; analytics.flush(); ids")
    tab.until(lambda: held != [], "the first batch")
    second = tab.page.evaluate("const ids = [analytics.track('second')]; analytics.flush(); ids")
    assert len(tab.api_requests) == 1
    held[0].continue_()
    lines = tab.lines(server, 2)
    assert [line["id"] for line in lines] == first + second
    assert [event_ids(r.post_data) for r in tab.api_requests] == [first, second]


def test_leaving_the_page_sends_queued_events_by_beacon(start_server: Callable[..., Server], site: Site, tab: Tab):
    """Events still queued when the visitor navigates away are delivered with navigator.sendBeacon."""
    server = start_server(workers=2)
    tab.page.add_init_script(SPY_BEACONS)
    tab.page.goto(site.page_url(f"{server.url}/analytics.js", flush_interval=600000))
    ids = tab.page.evaluate("[analytics.track('read', {slug: 'a'}), analytics.track('bookmark', {id: 7})]")
    assert tab.api_requests == []
    tab.page.goto(site.url + "/blank.html")
    lines = tab.lines(server, 2)
    assert [line["id"] for line in lines] == ids
    assert len({line["request_id"] for line in lines}) == 1
    beacons = tab.page.evaluate("JSON.parse(sessionStorage.getItem('test:beacons'))")
    assert [(b["url"], b["queued"]) for b in beacons] == [(f"{server.url}/api/analytics", True)]
    assert event_ids(beacons[0]["data"]) == ids
    assert tab.api_requests == []
    assert tab.stored_unsent() == []


def test_503_twice_then_200_logs_every_event_once(start_server: Callable[..., Server], site: Site, tab: Tab):
    """Two 503s are retried with the same event ids; the third try is logged, and only it."""
    server = start_server(workers=2)
    # data-endpoint names the same service by another host name, so the route sees only what it names.
    endpoint = f"http://localhost:{server.port}/api/analytics"
    unavailable_twice, tries = answer_first(2, 503, '{"error": "Service unavailable"}')
    tab.page.route(endpoint, unavailable_twice)
    tab.page.goto(site.page_url(f"{server.url}/analytics.js", endpoint=endpoint, flush_interval=600000, retry_base=50))
    ids = tab.page.evaluate("const ids = [1, 2, 3].map(n => analytics.track('step', {n})); analytics.flush(); ids")
    lines = tab.lines(server, 3)
    assert [line["id"] for line in lines] == ids
    assert [line["payload"] for line in lines] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert len(tries) == 3
    assert [event_ids(body) for body in tries] == [ids, ids, ids]


def test_retry_after_sets_the_wait(start_server: Callable[..., Server], site: Site, tab: Tab):
    """A 429's Retry-After: 0 replaces a backoff that could last up to an hour."""
    server = start_server(workers=2)
    endpoint = f"{server.url}/api/analytics"
    rate_limited_once, tries = answer_first(
        1,
        429,
        '{"error": "Too many requests"}',
        **{"Access-Control-Expose-Headers": "Retry-After", "Retry-After": "0"},
    )
    tab.page.route(endpoint, rate_limited_once)
    tab.page.goto(
        site.page_url(f"{server.url}/analytics.js", flush_interval=600000, retry_base=3600000, retry_max=3600000)
    )
    ids = tab.page.evaluate("const ids = [analytics.track('x')]; analytics.flush(); ids")
    lines = tab.lines(server, 1)
    assert [line["id"] for line in lines] == ids
    assert [event_ids(body) for body in tries] == [ids, ids]


# Records in window.fetches when each fetch was made and when its answer came (performance.now(), ms), with its
# status. The answer's time is taken before the client's own await resumes, so before it sets its wait.
TIME_FETCHES = """
window.fetches = [];
const fetchToTime = window.fetch.bind(window);
window.fetch = (...args) => {
  const entry = {start: performance.now()};
  window.fetches.push(entry);
  return fetchToTime(...args).then((response) => {
    Object.assign(entry, {end: performance.now(), status: response.status});
    return response;
  });
};
"""


def test_real_429_from_the_rate_limit_is_retried_after_its_retry_after(
    start_server: Callable[..., Server], site: Site, tab: Tab
):
    """The service's own rate limit (RATE_LIMIT of 1 batch per 4 seconds, one worker): the page's second batch gets
    a real 429 whose Retry-After it can read cross-origin, sends it again no sooner than that (its own backoff would
    wait up to an hour), and it is logged once."""
    server = start_server(workers=1, env={"ANALYTICS_RATE_LIMIT": "1 per 4 seconds"})
    tab.page.add_init_script(TIME_FETCHES)
    tab.page.goto(
        site.page_url(f"{server.url}/analytics.js", flush_interval=600000, retry_base=3600000, retry_max=3600000)
    )
    first = tab.page.evaluate("const firstIds = [analytics.track('first')]; analytics.flush(); firstIds")
    tab.lines(server, 1)
    second = tab.page.evaluate("const secondIds = [analytics.track('second')]; analytics.flush(); secondIds")
    lines = tab.lines(server, 2)
    assert [line["id"] for line in lines] == first + second
    answers = [request.response() for request in tab.api_requests]
    assert [answer.status if answer else None for answer in answers] == [200, 429, 200]
    refused = answers[1]
    assert refused is not None and refused.json() == {"error": "Too many requests"}
    retry_after = int(refused.headers["retry-after"])
    assert 1 <= retry_after <= 5
    assert [event_ids(request.post_data) for request in tab.api_requests] == [first, second, second]
    fetches = tab.page.evaluate("window.fetches")
    assert [fetch["status"] for fetch in fetches] == [200, 429, 200]
    assert fetches[2]["start"] - fetches[1]["end"] >= retry_after * 1000 - 20  # a timer may fire a tick early


def test_400_is_not_retried_and_rejected_events_are_dropped(start_server: Callable[..., Server], site: Site, tab: Tab):
    """A batch the service refuses with 400 is dropped, not retried; rejected events are warned about."""
    server = start_server(workers=2)
    tab.page.goto(site.page_url(f"{server.url}/analytics.js", flush_interval=600000, retry_base=50))
    # An empty type is invalid: a batch of only that is a 400 with its rejection.
    invalid = tab.page.evaluate("const id = analytics.track('', {}); analytics.flush(); id")
    tab.until(lambda: any(r.response() for r in tab.api_requests), "the answer to the first batch")
    assert tab.api_requests[0].response().status == 400
    # Were that 400 retried, it would hold the line and this batch would never go.
    valid, rejected = tab.page.evaluate(
        "const ids = [analytics.track('ok'), analytics.track('', {n: 2})]; analytics.flush(); ids"
    )
    lines = tab.lines(server, 1)
    tab.until(lambda: len(tab.warnings) >= 3, "the console warnings")
    assert [line["id"] for line in lines] == [valid]
    assert [event_ids(r.post_data) for r in tab.api_requests] == [[invalid], [valid, rejected]]
    assert [r.response().status for r in tab.api_requests] == [400, 200]
    assert [w.split(" ")[:3] for w in tab.warnings] == [
        ["analytics:", "batch", "refused"],
        ["analytics:", "event", "rejected"],
        ["analytics:", "event", "rejected"],
    ]


def test_403_is_dropped_with_a_warning(start_server: Callable[..., Server], site: Site, tab: Tab):
    """A 403 the page can read is like any other 4xx: tried once, dropped with a warning; the queue moves on."""
    server = start_server(workers=2)
    endpoint = f"{server.url}/api/analytics"
    forbidden_once, tries = answer_first(1, 403, '{"error": "Origin not allowed"}')
    tab.page.route(endpoint, forbidden_once)
    tab.page.goto(site.page_url(f"{server.url}/analytics.js", flush_interval=600000, retry_base=50))
    refused = tab.page.evaluate("const ids = [analytics.track('a')]; analytics.flush(); ids")
    tab.until(lambda: tab.warnings != [], "the warning")
    taken = tab.page.evaluate("const ids = [analytics.track('b')]; analytics.flush(); ids")
    assert [line["id"] for line in tab.lines(server, 1)] == taken
    assert [event_ids(body) for body in tries] == [refused, taken]
    assert tab.warnings == ["analytics: batch refused 403 {error: Origin not allowed} [Object]"]


def test_origin_the_service_refuses_is_tried_six_times(start_server: Callable[..., Server], site: Site, tab: Tab):
    """A page on an origin CORS_ORIGINS leaves out: nothing is written, each batch is dropped after six tries."""
    server = start_server(workers=2, env={"ANALYTICS_CORS_ORIGINS": '["https://shop.example"]'})
    tab.page.goto(site.page_url(f"{server.url}/analytics.js", flush_interval=600000, retry_base=50, retry_max=200))
    first = tab.page.evaluate("const ids = [analytics.track('a')]; analytics.flush(); ids")
    tab.until(lambda: len(tab.warnings) == 1, "the first batch dropped")
    # One batch is in flight at a time: were the first still being retried, this one would never go.
    second = tab.page.evaluate("const ids = [analytics.track('b')]; analytics.flush(); ids")
    tab.until(lambda: len(tab.warnings) == 2, "the second batch dropped")
    # The service's 403 carries no CORS headers: the page sees only a failed fetch, as on a network error.
    assert [event_ids(r.post_data) for r in tab.api_requests] == [first] * 6 + [second] * 6
    assert [r.failure for r in tab.api_requests] == ["net::ERR_FAILED"] * 12
    assert [w.split(" ")[:7] for w in tab.warnings] == [
        ["analytics:", "events", "dropped", "after", str(MAX_TRIES_UNANSWERED), "failed", "tries"]
    ] * 2
    # An event sent with no Origin, as a server sends it, is written: once its line is there, a line
    # written for any earlier request would be there too.
    status, _, _ = server.post("/api/analytics", b'{"events": [{"type": "control"}]}')
    assert status == 200
    assert [line["type"] for line in tab.lines(server, 1)] == ["control"]


def test_5xx_is_retried_up_to_the_cap(start_server: Callable[..., Server], site: Site, tab: Tab):
    """A batch the service keeps failing with 503 is tried 20 times, then dropped; the next batch goes."""
    server = start_server(workers=2)
    endpoint = f"{server.url}/api/analytics"
    tries: list[str | None] = []

    def unavailable_for_doomed(route: Route) -> None:
        if '"type":"doomed"' in (route.request.post_data or ""):
            tries.append(route.request.post_data)
            route.fulfill(status=503, headers={"Access-Control-Allow-Origin": "*"}, body="{}")
        else:
            route.continue_()

    tab.page.route(endpoint, unavailable_for_doomed)
    tab.page.goto(site.page_url(f"{server.url}/analytics.js", flush_interval=600000, retry_base=1, retry_max=1))
    doomed = tab.page.evaluate("const ids = [analytics.track('doomed')]; analytics.flush(); ids")
    tab.until(lambda: tab.warnings != [], "the batch dropped")
    later = tab.page.evaluate("const ids = [analytics.track('later')]; analytics.flush(); ids")
    assert [line["id"] for line in tab.lines(server, 1)] == later
    assert [event_ids(body) for body in tries] == [doomed] * MAX_TRIES
    assert [w.split(" ")[:8] for w in tab.warnings] == [
        ["analytics:", "events", "dropped", "after", str(MAX_TRIES), "failed", "tries", "503"]
    ]


def test_stored_events_are_tried_by_a_bounded_number_of_pages(
    start_server: Callable[..., Server], site: Site, tab: Tab
):
    """Unsent events go to the next page with their count of tries: after the sixth unanswered one, none is left."""
    server = start_server(workers=2)
    endpoint = f"{server.url}/api/analytics"
    tries: list[str | None] = []

    def unreachable_for_doomed(route: Route) -> None:
        if '"type":"doomed"' in (route.request.post_data or ""):
            tries.append(route.request.post_data)
            route.abort()
        else:
            route.continue_()

    tab.page.route(endpoint, unreachable_for_doomed)
    tab.page.add_init_script(COUNT_SETTLED)
    # The retry waits up to an hour: each page tries once, when it loads (the first one when the event is tracked).
    url = site.page_url(f"{server.url}/analytics.js", flush_interval=600000, retry_base=3600000, retry_max=3600000)
    tab.page.goto(url)
    doomed = tab.page.evaluate("const ids = [analytics.track('doomed')]; analytics.flush(); ids")
    for page in range(1, MAX_TRIES_UNANSWERED + 1):
        tab.until(lambda: tab.page.evaluate("window.settled") == 1, f"the try of page {page}")
        tab.page.reload()
    # The page after the sixth try sends only what it tracks itself.
    later = tab.page.evaluate("const ids = [analytics.track('later')]; analytics.flush(); ids")
    assert [line["id"] for line in tab.lines(server, 1)] == later
    assert [event_ids(body) for body in tries] == [doomed] * MAX_TRIES_UNANSWERED
    assert [event_ids(r.post_data) for r in tab.api_requests] == [doomed] * MAX_TRIES_UNANSWERED + [later]
    assert [w.split(" ")[:5] for w in tab.warnings] == [
        ["analytics:", "events", "dropped", "after", str(MAX_TRIES_UNANSWERED)]
    ]
    assert tab.stored_unsent() == []


def test_tries_while_offline_do_not_count(start_server: Callable[..., Server], site: Site, tab: Tab):
    """Offline, the client keeps retrying past the cap without dropping anything; back online, the events go."""
    server = start_server(workers=2)
    tab.page.add_init_script(COUNT_SETTLED)
    tab.page.goto(site.page_url(f"{server.url}/analytics.js", flush_interval=600000, retry_base=10, retry_max=10))
    tab.page.context.set_offline(True)
    ids = tab.page.evaluate("const ids = [analytics.track('in_a_tunnel')]; analytics.flush(); ids")
    tab.until(lambda: tab.page.evaluate("window.settled") > 2 * MAX_TRIES_UNANSWERED, "tries past the cap")
    tab.page.context.set_offline(False)
    assert [line["id"] for line in tab.lines(server, 1)] == ids
    assert tab.warnings == []


def test_413_splits_the_batch(start_server: Callable[..., Server], site: Site, tab: Tab):
    """A batch over the service's body limit is sent again as two halves, each logged once."""
    server = start_server(workers=2, env={"ANALYTICS_MAX_BODY_BYTES": "5000"})
    tab.page.goto(site.page_url(f"{server.url}/analytics.js", flush_interval=600000))
    # 20 events of about 350 bytes: a batch of all 20 is over 5000 bytes, half of them under.
    ids = tab.page.evaluate("Array.from({length: 20}, (_, n) => analytics.track('item', {n, pad: 'x'.repeat(150)}))")
    lines = tab.lines(server, 20)
    assert [line["id"] for line in lines] == ids
    assert len({line["request_id"] for line in lines[:10]}) == 1
    assert len({line["request_id"] for line in lines[10:]}) == 1
    assert lines[0]["request_id"] != lines[10]["request_id"]
    assert [event_ids(r.post_data) for r in tab.api_requests] == [ids, ids[:10], ids[10:]]
    assert [r.response().status for r in tab.api_requests] == [413, 200, 200]


def test_unsent_events_are_sent_by_the_next_page(start_server: Callable[..., Server], site: Site, tab: Tab):
    """Events the failing service did not take survive a reload in localStorage and go from the next page."""
    server = start_server(workers=2)
    endpoint = f"{server.url}/api/analytics"
    failing = True
    tries: list[str | None] = []

    def unavailable_while_failing(route: Route) -> None:
        tries.append(route.request.post_data)
        if failing:
            route.fulfill(status=503, headers={"Access-Control-Allow-Origin": "*"}, body="{}")
        else:
            route.continue_()

    tab.page.route(endpoint, unavailable_while_failing)
    tab.page.add_init_script(SPY_BEACONS)
    # The retry waits up to an hour: only the reload can send these events.
    url = site.page_url(f"{server.url}/analytics.js", flush_interval=600000, retry_base=3600000, retry_max=3600000)
    tab.page.goto(url)
    ids = tab.page.evaluate("const ids = [analytics.track('a'), analytics.track('b')]; analytics.flush(); ids")
    tab.until(lambda: len(tries) == 1, "the first try")
    ids.append(tab.page.evaluate("analytics.track('c')"))  # queued behind the failing batch
    failing = False
    tab.page.reload()
    lines = tab.lines(server, 3)
    assert [line["id"] for line in lines] == ids
    assert [event_ids(body) for body in tries] == [ids[:2], ids]
    # No beacon: with the service failing, the leaving page kept its events for the next one.
    assert tab.page.evaluate("sessionStorage.getItem('test:beacons')") is None
    assert tab.stored_unsent() == []


def test_global_privacy_control_sends_nothing(start_server: Callable[..., Server], site: Site, tab: Tab):
    """With GPC set nothing is sent or stored; data-respect-privacy="false" turns that off."""
    server = start_server(workers=2)
    tab.page.add_init_script(GPC + SPY_SENDS)
    tab.page.goto(site.page_url(f"{server.url}/analytics.js", page_view=True, flush_interval=50))
    result = tab.page.evaluate(
        """() => {
            const ids = Array.from({length: 25}, (_, n) => analytics.track('click', {n}));
            analytics.identify('user-1');
            analytics.flush();
            dispatchEvent(new PageTransitionEvent('pagehide'));
            return {gpc: navigator.globalPrivacyControl, enabled: analytics.enabled, ids, sends: window.sends,
                    local: Object.keys(localStorage), session: Object.keys(sessionStorage)};
        }"""
    )
    assert result == {"gpc": True, "enabled": False, "ids": [None] * 25, "sends": [], "local": [], "session": []}
    tab.page.goto(site.url + "/blank.html")
    assert server.lines() == []
    # The same browser with the setting off does send: the check above can see a send.
    tab.page.goto(site.page_url(f"{server.url}/analytics.js", respect_privacy="false", flush_interval=50))
    event_id, enabled = tab.page.evaluate("[analytics.track('click'), analytics.enabled]")
    assert enabled is True
    assert [line["id"] for line in tab.lines(server, 1)] == [event_id]
    assert tab.page.evaluate("window.sends") == [["fetch", f"{server.url}/api/analytics"]]


def test_pinned_tags_across_an_upgrade(start_server: Callable[..., Server], site: Site, tab: Tab):
    """The current pin loads under its integrity hash; an older pin is redirected to it: followed without
    integrity (the redirect's CORS headers let a crossorigin load follow it), blocked by the browser with it."""
    server = start_server(workers=2)
    script = SCRIPT_PATH.read_bytes()
    version = hashlib.sha256(script).hexdigest()[:16]
    integrity = "sha384-" + base64.b64encode(hashlib.sha384(script).digest()).decode()
    older_integrity = "sha384-" + base64.b64encode(hashlib.sha384(b"// an older analytics.js\n").digest()).decode()
    scripts: list[tuple[int, str]] = []
    tab.page.on("response", lambda r: scripts.append((r.status, r.url)) if "/analytics.js" in r.url else None)
    blocked: list[str] = []
    tab.page.on("console", lambda m: blocked.append(m.text) if "'integrity'" in m.text else None)

    def load(v: str, integrity: str | None) -> str:
        """Load the test page with a pinned tag; what ``analytics`` is on it."""
        scripts.clear()
        hash_attribute = f' integrity="{integrity}"' if integrity else ""
        site.script_tag = (
            f'<script src="{server.url}/analytics.js?v={v}"{hash_attribute} crossorigin="anonymous"></script>'
        )
        tab.page.goto(site.url + "/page.html")
        return tab.page.evaluate("typeof analytics")

    current = f"{server.url}/analytics.js?v={version}"
    older = f"{server.url}/analytics.js?v=0123456789abcdef"
    assert load(version, integrity) == "object"
    assert scripts == [(200, current)]
    assert load("0123456789abcdef", None) == "object"
    assert scripts == [(302, older), (200, current)]
    assert blocked == []
    assert load("0123456789abcdef", older_integrity) == "undefined"
    assert scripts == [(302, older), (200, current)]
    assert len(blocked) == 1
    # The browser names the tag's URL, and the hash of what the redirect led to: the current script.
    assert f"resource '{older}' with computed SHA-384 integrity '{integrity.removeprefix('sha384-')}'" in blocked[0]
    assert blocked[0].endswith("The resource has been blocked.")


def test_demo_page(start_server: Callable[..., Server], tab: Tab):
    """/demo loads the client from its own origin, its buttons track events; a screenshot is kept."""
    server = start_server(workers=2)
    tab.page.set_viewport_size({"width": 1000, "height": 800})
    tab.page.goto(server.url + "/demo")
    assert tab.page.locator("#privacy-notice").is_hidden()
    assert tab.page.evaluate("analytics.enabled") is True
    tab.page.click("#signup")
    tab.page.click("#add-to-cart")
    tab.page.fill("#query", "backoff")
    tab.page.click("#search")
    tab.page.click("#identify")
    tab.page.click("#signup")
    tab.page.click("#flush")
    lines = tab.lines(server, 5)
    assert [line["type"] for line in lines] == [
        "page_view",
        "signup_click",
        "add_to_cart",
        "search_query",
        "signup_click",
    ]
    assert lines[0]["payload"]["url"] == server.url + "/demo"
    assert lines[3]["payload"] == {"query": "backoff"}
    assert ["userId" in line for line in lines] == [False, False, False, False, True]
    assert lines[4]["userId"] == "user-42"
    tab.page.wait_for_function("document.getElementById('log').textContent.includes('-> 200')")
    ARTIFACTS.mkdir(exist_ok=True)
    tab.page.screenshot(path=ARTIFACTS / "demo.png", full_page=True)
    assert (ARTIFACTS / "demo.png").stat().st_size > 0


@pytest.mark.parametrize(
    "signal, init_script", [("Global Privacy Control", GPC), ("Do Not Track", DNT)], ids=["gpc", "dnt"]
)
def test_demo_page_says_when_nothing_is_sent(
    start_server: Callable[..., Server], tab: Tab, signal: str, init_script: str
):
    """Under GPC or Do Not Track, /demo says it sends nothing and why, and its log says so for each button."""
    server = start_server(workers=2)
    tab.page.add_init_script(init_script + SPY_SENDS)
    tab.page.set_viewport_size({"width": 1000, "height": 800})
    tab.page.goto(server.url + "/demo")
    notice = tab.page.locator("#privacy-notice")
    assert notice.is_visible()
    assert notice.text_content().startswith(
        f"Not sending: your browser signals {signal}, and analytics.js respects it."
    )
    tab.page.click("#signup")
    tab.page.click("#flush")
    log = tab.page.text_content("#log")
    assert f'track signup_click {{"plan":"pro"}}: not sent ({signal})' in log
    assert "Tracked" not in tab.page.text_content("#status")
    assert tab.page.evaluate("[analytics.enabled, window.sends]") == [False, []]
    if signal == "Global Privacy Control":
        ARTIFACTS.mkdir(exist_ok=True)
        tab.page.screenshot(path=ARTIFACTS / "demo-gpc.png", full_page=True)
