"""The engine every edge feeds: bounded queues with deadlines, a dynamic batcher for embeddings and
classification, a continuous batcher for generation, and a pool of served models with hot swaps."""

from .dynamic import BatchConfig, DynamicBatcher, next_batch
from .generation import GenerationConfig, GenerationEngine, TokenEvent
from .pool import ModelPool, PoolConfig, ServedVersion

__all__ = [
    "BatchConfig",
    "DynamicBatcher",
    "GenerationConfig",
    "GenerationEngine",
    "ModelPool",
    "PoolConfig",
    "ServedVersion",
    "TokenEvent",
    "next_batch",
]
