"""What the continuous decode batch adds to a transformers model (extra ``[ml]``).

- `GrowingLayer`: a KV-cache layer over buffers with free columns. transformers' `DynamicLayer`
  appends with `torch.cat`, which copies the whole cache of every layer at every step: a cost that
  grows with the context. Here a step writes one column in place; the buffers are reallocated only
  when a row joins or leaves, or when the free columns run out (then with room for half as much
  again, so the copies stay a constant share of the work).
- `decode_attention`: attention for one new token per row as two batched matrix products per
  group of query heads that share a key/value head. On CPUs the scaled-dot-product kernel is much
  slower for a single query than for a prompt (on an AVX-512 bf16 machine: 2 ms against 0.3 ms per
  layer at 32 rows and 100 cached tokens, 18 ms against 0.6 ms at 560), and it dominates the step.
  It replaces the model's attention only inside `decoding()` (the decode batch's steps);
  transformers' own `generate`, prompt prefill and every other caller keep the model's
  scaled-dot-product attention.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

ATTENTION = "moorage_decode"
MIN_ROOM = 64  # columns added at least when the buffers grow

_state = threading.local()  # inside decoding(): on the thread that runs the decode step


@contextmanager
def decoding() -> Iterator[None]:
    previous = getattr(_state, "active", False)
    _state.active = True
    try:
        yield
    finally:
        _state.active = previous


def use_decode_attention(model: Any) -> bool:
    """Route `model`'s attention through `attention` (scaled-dot-product outside `decoding()`).

    Only models on a CPU that use transformers' scaled-dot-product attention are changed (the slow
    single-query kernel is the CPU's); others keep theirs. Says whether the model was changed."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa" or model.device.type != "cpu":
        return False
    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the same masks as sdpa
    model.config._attn_implementation = ATTENTION
    return True


def attention(module: Any, query, key, value, attention_mask, scaling: float | None = None, **kwargs):
    if query.shape[2] == 1 and getattr(_state, "active", False) and not kwargs.get("output_attentions"):
        return decode_attention(query, key, value, attention_mask, scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def decode_attention(query, key, value, attention_mask, scaling: float | None):
    """Attention of one query token per row: `query` (rows, heads, 1, dim) over `key` and `value`
    (rows, kv_heads, length, dim); `attention_mask` is sdpa's (rows, 1, 1, length) boolean mask or an
    additive one, or None. Answers (rows, 1, heads, dim), as transformers' attention functions do.

    Query heads that share a key/value head (grouped-query attention) are one matrix product with
    it, so no key or value is repeated or copied. The scores come out of that product in the
    model's dtype, as in transformers' eager attention, and the softmax runs in float32. In float32
    the outputs are sdpa's up to rounding; in bf16 they differ from sdpa's in the last bits, as
    sdpa's own do between two batch shapes (greedy bf16 outputs already depend on what else is in
    the batch).
    """
    rows, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(rows, kv_heads, (heads // kv_heads) * q_len, dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float()
    scores.mul_(dim**-0.5 if scaling is None else scaling)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores.masked_fill_(~attention_mask, float("-inf"))
        else:
            scores.add_(attention_mask)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # (rows, kv_heads, group * q_len, dim)
    return out.reshape(rows, heads, q_len, dim).transpose(1, 2), None


class GrowingLayer(DynamicLayer):
    """A cache layer over zeroed buffers with free columns at the end.

    `update` writes the new columns in place. With `whole=True` it answers the whole buffers, free
    columns included: matrix products over a contiguous buffer are much faster than over a slice of
    it (bf16 kernels copy a slice first), and the decode batch's mask leaves the free columns out
    (they hold zeros, so nothing undefined can leak into the attention). Attention functions that
    build their own masks from the cache length get the used part only (`whole=False`).
    `keys` and `values` are always the used part.
    """

    def __init__(self, keys, values, room: int, whole: bool = True) -> None:
        super().__init__()
        self.whole = whole
        self.hold(keys, values, room)

    def hold(self, keys, values, room: int) -> None:
        """Hold these keys and values (rows joined or left, columns trimmed) with `room` free columns."""
        rows, heads, length, dim = keys.shape
        self._keys = keys.new_zeros((rows, heads, length + room, dim))
        self._values = values.new_zeros((rows, values.shape[1], length + room, values.shape[-1]))
        self._keys[:, :, :length] = keys
        self._values[:, :, :length] = values
        self.length = length
        self.keys, self.values = self._keys[:, :, :length], self._values[:, :, :length]
        self.device, self.dtype, self.is_initialized = keys.device, keys.dtype, True

    @property
    def capacity(self) -> int:
        return self._keys.shape[2]

    def update(self, key_states, value_states, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError("no free column in the KV cache: the decode batch reserves room before each step")
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return (self._keys, self._values) if self.whole else (self.keys, self.values)
