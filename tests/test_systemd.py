"""deploy/systemd: the units pass systemd-analyze; gunicorn started as they say loses nothing in a reload or restart.

systemd itself does not run here, so the behaviour tests do what the units tell systemd to do:
the socket of analytics.socket handed over as fd 3 with LISTEN_FDS, the unit's ExecStart run in
its WorkingDirectory with its Environment= lines, NOTIFY_SOCKET for Type=notify, ExecReload's
SIGHUP to the master, and for a restart SIGTERM to the master alone (KillMode=mixed) while the
socket stays open. The shipped files are the ones read: only /opt/analytics becomes this checkout
and /run/analytics a temporary directory.
"""

import http.client
import runpy
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest

from tests.harness.clients import send
from tests.harness.gunicorn import Server
from tests.harness.load import Batch, Outcome, expected_answer, make_batches, summarize

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "deploy" / "systemd"
INSTALLED = "/opt/analytics"
RUNTIME = "/run/analytics"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (apt-get install systemd)"
)
# The PATH systemd gives a system service; nothing else of this test's environment reaches gunicorn.
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What systemd does for a socket-activated service, in the process that then becomes gunicorn: the
# socket at fd 3 (the first of LISTEN_FDS) and LISTEN_PID naming that process, which gunicorn checks.
ACTIVATE = (
    "import os, sys\n"
    "fd = int(sys.argv[1])\n"
    "if fd != 3:\n"
    "    os.dup2(fd, 3)\n"
    "    os.close(fd)\n"
    "os.environ['LISTEN_PID'] = str(os.getpid())\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)
WORKERS = 4
# Answers to wait for before the first SIGHUP and after each reload has replaced every worker.
ANSWERS_BETWEEN = 150
CLIENTS = 12


def service_settings(unit: str) -> dict[str, list[str]]:
    """The [Service] section of a unit file: each key's values, in order (Environment= may repeat)."""
    settings: dict[str, list[str]] = {}
    section = None
    for raw in (UNITS / unit).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def for_checkout(text: str, runtime: Path) -> str:
    """A unit's text (or a value of it) with the installed paths replaced by this checkout and ``runtime``."""
    return text.replace(INSTALLED, str(ROOT)).replace(RUNTIME, str(runtime))


def analyze(*args: str) -> subprocess.CompletedProcess:
    """systemd-analyze with ``args``, its output captured."""
    assert SYSTEMD_ANALYZE
    return subprocess.run([SYSTEMD_ANALYZE, *args], capture_output=True, text=True, timeout=60)


def units_for_checkout(tmp_path: Path) -> list[Path]:
    """Both units, their paths pointing into this checkout: verify checks that ExecStart's program exists."""
    copies = []
    for unit in ("analytics.service", "analytics.socket"):
        copy = tmp_path / unit
        copy.write_text(for_checkout((UNITS / unit).read_text(), tmp_path / "run"))
        copies.append(copy)
    return copies


@needs_systemd_analyze
def test_units_pass_systemd_analyze_verify(tmp_path):
    """systemd-analyze verify finds nothing to say about the units: no unknown key, no bad value, no missing program."""
    assert INSTALLED in (UNITS / "analytics.service").read_text()
    result = analyze("verify", "--man=no", *map(str, units_for_checkout(tmp_path)))
    # verify exits 0 after warnings such as "Unknown key": any output at all is a finding.
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@needs_systemd_analyze
def test_verify_sees_a_bad_unit(tmp_path):
    """The check above can fail: a misspelled key and a program that is not there are both reported."""
    service, socket_unit = units_for_checkout(tmp_path)
    text = service.read_text().replace("ProtectSystem=", "ProtectSytem=")
    service.write_text(text.replace(f"{ROOT}/.venv/bin/gunicorn", f"{ROOT}/.venv/bin/no-such-gunicorn"))
    result = analyze("verify", "--man=no", str(service), str(socket_unit))
    assert "Unknown key 'ProtectSytem'" in result.stderr
    assert "no-such-gunicorn is not executable" in result.stderr


@needs_systemd_analyze
def test_service_sandbox_scores_safe(tmp_path):
    """systemd-analyze security rates the service's exposure at most 0.9 of 10 ("SAFE"; 9.6 without a sandbox):
    loosening the sandbox fails this."""
    service, _ = units_for_checkout(tmp_path)
    # --threshold is on a 0-100 scale (the report's 0.0-10.0 times ten): 9 is the shipped unit's 0.9.
    result = analyze("security", "--offline=yes", "--threshold=9", "--no-pager", str(service))
    assert result.returncode == 0, result.stdout.splitlines()[-1:] + result.stderr.splitlines()


def test_stop_waits_for_gunicorns_graceful_timeout():
    """systemd sends SIGTERM to the master alone and waits longer than gunicorn lets requests in flight finish."""
    settings = service_settings("analytics.service")
    graceful_timeout = runpy.run_path(str(ROOT / "gunicorn.conf.py"))["graceful_timeout"]
    assert settings["KillMode"] == ["mixed"] and settings["KillSignal"] == ["SIGTERM"]
    assert float(settings["TimeoutStopSec"][0]) > graceful_timeout
    assert settings["ExecReload"] == ["/bin/kill -s HUP $MAINPID"]
    # The event log is stdout: journald must neither drop (rate limit) nor reinterpret its lines.
    assert settings["StandardOutput"] == ["journal"]
    assert settings["LogRateLimitIntervalSec"] == ["0"]
    assert settings["SyslogLevelPrefix"] == ["no"]


class ActivatedServer(Server):
    """gunicorn started as analytics.service starts it, on a socket handed over as analytics.socket hands it.

    With ``hold_socket`` the test keeps its copy of the listening socket across ``stop`` and ``start``, as
    systemd does across ``systemctl restart``; without it, gunicorn's master holds the only one.
    """

    def __init__(self, tmp_path: Path, workers: int, hold_socket: bool = False) -> None:
        super().__init__(tmp_path, workers=workers)
        self.hold_socket = hold_socket
        self._listener.listen(4096)
        self.runtime = tmp_path / "run"
        settings = service_settings("analytics.service")
        self.command = [for_checkout(word, self.runtime) for word in shlex.split(settings["ExecStart"][0])]
        self.cwd = for_checkout(settings["WorkingDirectory"][0], self.runtime)
        self.unit_environment = {
            name: for_checkout(value, self.runtime)
            for line in settings.get("Environment", [])
            for name, _, value in (word.partition("=") for word in shlex.split(line))
        }
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # Abstract (a leading NUL, "@" in NOTIFY_SOCKET): no path length limit, nothing left on disk.
        self.notify_name = f"analytics-test-{uuid.uuid4().hex}"
        self.notify.bind("\0" + self.notify_name)
        self.notify.settimeout(60)

    def start(self, timeout: float = 60) -> "ActivatedServer":
        """Start gunicorn, wait for its READY=1 (Type=notify) and for /healthz to answer."""
        # RuntimeDirectory=: created empty at each start, removed at each stop.
        self.runtime.mkdir(mode=0o700)
        environment = {
            "PATH": SYSTEMD_PATH,
            "LISTEN_FDS": "1",
            "NOTIFY_SOCKET": "@" + self.notify_name,
            "RUNTIME_DIRECTORY": str(self.runtime),
            # The one line of /etc/analytics/analytics.env this test needs.
            "WEB_CONCURRENCY": self._env["WEB_CONCURRENCY"],
            **self.unit_environment,
        }
        fd = self._listener.fileno()
        with self.stderr_path.open("ab") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-c", ACTIVATE, str(fd), *self.command],
                cwd=self.cwd,
                env=environment,
                stdout=subprocess.PIPE,
                stderr=stderr,
                pass_fds=(fd,),
            )
        if not self.hold_socket:
            # gunicorn has it now: a reload that closed it even for a moment would refuse connections.
            self._listener.close()
        assert self.process.stdout
        self._stdout_fd = self.process.stdout.fileno()
        self._start_reader()
        try:
            ready = self.notify.recv(4096)
        except TimeoutError:
            raise RuntimeError(f"gunicorn sent no READY=1: {self.stderr_path.read_text()}") from None
        assert b"READY=1" in ready.split(b"\n"), ready
        wait_for(lambda: healthy(self.url), timeout, "/healthz did not answer")
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Stop gunicorn (see Server.stop) and remove the runtime directory; the socket stays if held."""
        code = super().stop(sig, timeout)
        shutil.rmtree(self.runtime)
        return code

    def close(self) -> None:
        """Stop gunicorn if it runs, and close the sockets this test holds."""
        try:
            if self.process and self.process.poll() is None:
                self.stop()
        finally:
            self.notify.close()
            self._listener.close()


def healthy(url: str) -> bool:
    """Whether GET /healthz answers 200 now."""
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def wait_for(condition: Callable[[], bool], timeout: float, message: str) -> None:
    """Return once ``condition()`` holds; fail with ``message`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.05)


class Clients:
    """Clients that send batches with ids of their own, one after another, until told to stop; every outcome kept."""

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.outcomes: list[Outcome] = []
        # When each outcome's request was sent (time.monotonic()), in the same order.
        self.sent_at: list[float] = []
        self._in_flight = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,)) for n in range(count)]

    def start(self) -> None:
        """Start every client."""
        for thread in self._threads:
            thread.start()

    def answered(self) -> int:
        """How many requests have an outcome so far."""
        with self._lock:
            return len(self.outcomes)

    def in_flight_now(self) -> int:
        """How many requests have been sent and not answered yet."""
        with self._lock:
            return self._in_flight

    def stop(self) -> list[Outcome]:
        """Let each client finish its request in flight; every outcome."""
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in self._threads), "a client did not finish within 60 s"
        return self.outcomes

    def _run(self, client: int) -> None:
        number = 0
        while not self._stop.is_set():
            # Seeded by client and number: every batch has a shape of its own and ids no other batch has
            # (short ones: the smallest events are 60 bytes, id included).
            (batch,) = make_batches(1, tag=f"r{client}.{number}", seed=client * 1_000_003 + number)
            number += 1
            self._send(batch)

    def _send(self, batch: Batch) -> None:
        outcome = Outcome(batch)
        sent = time.monotonic()
        with self._lock:
            self._in_flight += 1
        try:
            outcome.status, headers, outcome.body = send(self.port, batch.body)
            outcome.request_id = headers.get("X-Request-ID")
        except (OSError, http.client.HTTPException, ValueError) as error:
            outcome.error = repr(error)
        with self._lock:
            self._in_flight -= 1
            self.outcomes.append(outcome)
            self.sent_at.append(sent)


def check_every_answer(outcomes: list[Outcome], lines: list[dict]) -> None:
    """Every request got its 200 with the body its batch is owed, and the log holds each acknowledged event once."""
    failed = [(summarize(o), o.error) for o in outcomes if o.error or summarize(o) != expected_answer(o.batch)]
    assert failed == [], f"{len(failed)} of {len(outcomes)} requests refused, cut off or wrongly answered"
    logged = Counter(line["id"] for line in lines)
    acknowledged = {event_id for outcome in outcomes for event_id in outcome.batch.accepted}
    assert {event_id for event_id, times in logged.items() if times > 1} == set()
    assert acknowledged - logged.keys() == set(), "acknowledged events missing from the log"
    assert logged.keys() - acknowledged == set(), "events in the log that no answer acknowledged"


def test_reload_under_load_loses_nothing_and_refuses_nothing(tmp_path):
    """Two reloads (ExecReload's SIGHUP) while clients keep sending: every worker is replaced each time, every
    request gets its 200 with the right body, and every acknowledged event is in the log exactly once."""
    in_flight_at_signal = []
    with closing(ActivatedServer(tmp_path, workers=WORKERS)) as server:
        server.start()
        clients = Clients(server.port, CLIENTS)
        try:
            clients.start()
            wait_for(lambda: clients.answered() >= ANSWERS_BETWEEN, 120, "the load did not get going")
            for _ in range(2):
                before = server.worker_pids()
                in_flight_at_signal.append(clients.in_flight_now())
                server.process.send_signal(signal.SIGHUP)
                # Reloaded: none of the old workers left, a full set of new ones.
                wait_for(
                    lambda before=before: not server.worker_pids() & before and len(server.worker_pids()) == WORKERS,
                    120,
                    f"the reload did not replace the workers {sorted(before)}",
                )
                mark = clients.answered()
                wait_for(lambda mark=mark: clients.answered() >= mark + ANSWERS_BETWEEN, 120, "no answers after it")
        finally:
            outcomes = clients.stop()
        assert server.stop() == 0, server.stderr_path.read_text()

    assert all(in_flight_at_signal), f"requests in flight at each SIGHUP: {in_flight_at_signal}"
    check_every_answer(outcomes, server.lines())


def test_restart_under_load_refuses_nothing(tmp_path):
    """systemctl restart while clients keep sending: the old gunicorn finishes its requests and exits, the
    new one starts on the socket systemd kept open, and connections made in between wait instead of being
    refused. Every request gets its 200, every acknowledged event is in the log exactly once."""
    with closing(ActivatedServer(tmp_path, workers=WORKERS, hold_socket=True)) as server:
        server.start()
        clients = Clients(server.port, CLIENTS)
        try:
            clients.start()
            wait_for(lambda: clients.answered() >= ANSWERS_BETWEEN, 120, "the load did not get going")
            in_flight_at_stop = clients.in_flight_now()
            assert server.stop() == 0, server.stderr_path.read_text()
            down = time.monotonic()
            server.start()
            up = time.monotonic()
            mark = clients.answered()
            wait_for(lambda: clients.answered() >= mark + ANSWERS_BETWEEN, 120, "no answers after the restart")
        finally:
            outcomes = clients.stop()
        assert server.stop() == 0, server.stderr_path.read_text()

    assert in_flight_at_stop, "no request was in flight when the restart began"
    waited = [outcome for outcome, sent in zip(outcomes, clients.sent_at, strict=True) if down <= sent <= up]
    assert waited, "no request was sent while no gunicorn was running"
    check_every_answer(outcomes, server.lines())
