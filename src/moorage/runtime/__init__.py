"""Model runtime: task handlers, verified loading, a memory-bounded cache, fake models."""

from .base import Classification, GenerateInput, Generation, GenerationParams, TaskHandler
from .cache import ModelCache
from .fake import make_fake_model
from .loader import HANDLERS, LoadedModel, Runtime, handler_for, load_version

__all__ = [
    "HANDLERS",
    "Classification",
    "GenerateInput",
    "Generation",
    "GenerationParams",
    "LoadedModel",
    "ModelCache",
    "Runtime",
    "TaskHandler",
    "handler_for",
    "load_version",
    "make_fake_model",
]
