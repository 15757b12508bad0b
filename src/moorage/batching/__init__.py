"""The engine every edge feeds: one request/result contract and the `InferenceService` that every
edge calls; bounded queues with deadlines, a dynamic batcher for embeddings and classification, a
continuous batcher for generation, and a pool of served models with hot swaps."""

from .contract import (
    FinishReason,
    GenerationParameters,
    Result,
    Task,
    encode_result,
    first_error,
)
from .dynamic import BatchConfig, DynamicBatcher, next_batch
from .generation import GenerationConfig, GenerationEngine, TokenEvent
from .pool import ModelPool, PoolConfig, ServedVersion
from .service import Call, InferenceService, Outcome

__all__ = [
    "BatchConfig",
    "Call",
    "DynamicBatcher",
    "FinishReason",
    "GenerationConfig",
    "GenerationEngine",
    "GenerationParameters",
    "InferenceService",
    "ModelPool",
    "Outcome",
    "PoolConfig",
    "Result",
    "ServedVersion",
    "Task",
    "TokenEvent",
    "encode_result",
    "first_error",
    "next_batch",
]
