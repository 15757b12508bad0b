"""Async and stream inference: brokers in, the same batching engine, sinks out, nothing lost.

    broker message -> decode + validate -> batcher (one per model version) -> sink write -> ack
                                   \\-> dead-letter entry with its reason (bad input, too many failures)

Delivery is at-least-once: a message is acknowledged only after its result is durable in the sink,
so a crash replays it; the SQL sink upserts by message id, so a replay changes nothing.
"""

from .brokers import Broker, DeadLetter, Message, open_broker
from .sinks import Sink, open_sink
from .worker import StreamWorker, WorkerConfig

__all__ = ["Broker", "DeadLetter", "Message", "Sink", "StreamWorker", "WorkerConfig", "open_broker", "open_sink"]
