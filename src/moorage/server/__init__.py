"""The HTTP edge: REST and OpenAI-compatible APIs over the batching engine."""

from .app import create_app

__all__ = ["create_app"]
