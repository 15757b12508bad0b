"""Brokers behind one small interface; each backend is a URL scheme (see `open_broker`)."""

from .base import Broker, BrokerURL, DeadLetter, Message, ReplyHandler, ReplyInbox, open_broker

__all__ = ["Broker", "BrokerURL", "DeadLetter", "Message", "ReplyHandler", "ReplyInbox", "open_broker"]
