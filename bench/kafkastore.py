"""The Kafka sink's broker for the benchmark: one local Tansu broker (memory storage) and its topics.

The broker is the tests' (``tests/harness/kafka.py``: the binary requirements-dev
installs, loopback). It is started from the harness's process, so it inherits the
load CPU's pinning: it runs beside wrk and the stdout readers, as the stdout
sink's pipe reader does, and the service's CPU holds only what the service itself
spends (its librdkafka producer).

Each service measured with the kafka sink gets a topic of its own with one
partition, made here before the service starts, and a consumer (in this
process, on the load CPU) that counts its records as they arrive: Tansu's
reported offsets are not the ends of its partitions, so counting is how the
events stored are known. Everything stays in the broker's memory: a run of a
few minutes holds well under a gigabyte.
"""

import threading
from pathlib import Path

from bench import BenchError, settle


class TopicCounter:
    """Counts a topic's records from its start, in a thread, until stopped."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        self.count = 0
        self._stop = threading.Event()
        self._consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": f"bench-{topic}", "enable.auto.commit": False}
        )
        self._consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        self._thread = threading.Thread(target=self._run, name=f"count-{topic}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.count += sum(message.error() is None for message in self._consumer.consume(1000, timeout=0.2))
        self._consumer.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


class KafkaStore:
    """One Tansu broker under ``root`` and the topics made on it; ``stop`` ends it."""

    def __init__(self, root: Path) -> None:
        # Imported here: the tests' harness (and pytest with it) is needed only when the kafka sink is measured.
        from tests.harness import kafka as harness

        if harness.find_binary() is None:
            raise BenchError("the kafka sink needs a broker: .venv/bin/pip install -r requirements-dev.txt")
        self._harness = harness
        self.broker = harness.KafkaBroker(root)
        self._counters: dict[str, TopicCounter] = {}

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap

    def start(self) -> None:
        """Start the broker and wait until it accepts clients."""
        try:
            self.broker.start()
        except RuntimeError as error:
            raise BenchError(f"the Kafka broker did not start: {error}") from None

    def add_topic(self, topic: str) -> None:
        """Make the topic a service will use (one partition) and start counting its records."""
        self._harness.create_topic(self.bootstrap, topic, partitions=1)
        self._counters[topic] = TopicCounter(self.bootstrap, topic)

    def settle(self, topic: str, quiet: float = 0.5, timeout: float = 30.0) -> int:
        """The topic's count once it has not grown for ``quiet`` seconds (requests in flight are done)."""
        counter = self._counters[topic]
        return settle(lambda: counter.count, f"topic {topic}", quiet, timeout)

    def stop(self) -> None:
        for counter in self._counters.values():
            counter.stop()
        self.broker.stop()
