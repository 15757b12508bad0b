"""A Kafka-protocol broker on 127.0.0.1 for tests and benchmarks: librdkafka's mock cluster.

confluent-kafka bundles librdkafka, whose mock cluster (``test.mock.num.brokers``) opens a real
Kafka listener that any client can use while this process lives. Run it as a program: it prints
``bootstrap=HOST:PORT`` on its first line, then serves until its stdin closes or it is killed.
"""

from __future__ import annotations

import logging
import queue
import sys


def main() -> None:
    from confluent_kafka import Producer

    found: queue.Queue[str] = queue.Queue()

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage()
            if "bootstrap.servers=" in text:
                found.put(text.split("bootstrap.servers=")[1].split()[0])

    logger = logging.getLogger("kafka-mock")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(Catch())
    producer = Producer({"test.mock.num.brokers": 1, "bootstrap.servers": "", "debug": "mock"}, logger=logger)
    producer.poll(0.2)
    bootstrap = found.get(timeout=10)
    print(f"bootstrap={bootstrap}", flush=True)
    logger.handlers.clear()
    sys.stdin.read()  # serve until the parent closes our stdin (or kills us)
    producer.flush(1)


if __name__ == "__main__":
    main()
