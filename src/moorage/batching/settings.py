"""The engine configs, built from the settings tree in one place.

A config field takes the setting of the same name, so a new engine knob with a same-named setting
needs no code here; only the names that differ (``request_timeout_s`` is the engine's
``timeout_s``) and the values derived for streams are written out.
"""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from ..config import Settings
from .dynamic import BatchConfig
from .generation import GenerationConfig
from .pool import PoolConfig

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")


def from_settings(config_cls: type[C], section: BaseModel, **given: Any) -> C:
    """A `config_cls` (a dataclass) with each field that `section` has a setting of the same name
    for, then the `given` values; the other fields keep their defaults."""
    settings = type(section).model_fields
    shared = {f.name: getattr(section, f.name) for f in fields(config_cls) if f.name in settings}
    return config_cls(**(shared | given))


def serving_pool_config(settings: Settings) -> PoolConfig:
    """The engines of an HTTP server: ``serve.*``."""
    serve = settings.serve
    timeout = {"timeout_s": serve.request_timeout_s}
    return from_settings(
        PoolConfig,
        serve,
        batch=from_settings(BatchConfig, serve, **timeout),
        generation=from_settings(GenerationConfig, serve, max_waiting=serve.max_waiting_seqs, **timeout),
    )


def stream_pool_config(settings: Settings) -> PoolConfig:
    """The engines of a stream worker: batches as large as a receive, room for the pipeline, the
    deadline of a message; the generation batch is sized as when serving."""
    stream = settings.stream
    room = stream.batch_size * (stream.max_in_flight + 2)
    timeout = {"timeout_s": stream.item_timeout_s}
    return from_settings(
        PoolConfig,
        settings.serve,
        batch=from_settings(BatchConfig, stream, max_batch_size=stream.batch_size, max_queue=room, **timeout),
        generation=from_settings(GenerationConfig, settings.serve, max_waiting=room, **timeout),
    )
