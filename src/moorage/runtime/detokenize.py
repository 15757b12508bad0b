"""Incremental detokenisation: the text of a sequence one token at a time, in constant work per token.

Decoding the whole sequence again after every token costs time in proportion to its length, so a
long answer costs the square of its length. Both detokenisers here decode only a short window: the
tokens of the last chunk shown (their text is known) followed by the tokens not shown yet. The new
text is what the window's text adds to the known part, once it does not end in half a character
(U+FFFD). Keeping the last shown tokens in the window matters: decoders render a token differently
at the start of a text (a SentencePiece word loses its leading space) and across tokens (bytes of
one character split over two byte-level tokens).

Special tokens are dropped before they enter the window, which is what decoding the whole sequence
with ``skip_special_tokens=True`` does, and keeps a skipped token from becoming a window's first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

REPLACEMENT = "\ufffd"  # what a decoder shows for bytes that are not (yet) a whole character


class Detokenizer(Protocol):
    """The text of one sequence, token by token."""

    def push(self, token_id: int) -> str:
        """The text that token completes; "" while it ends in the middle of a character."""
        ...

    def flush(self) -> str:
        """The end of the sequence: the text still held back, as decoding the whole sequence shows it."""
        ...


class WindowDetokenizer:
    """The prefix-offset technique over any `decode(ids) -> str` (vLLM's detokenizer does the same)."""

    def __init__(self, decode: Callable[[list[int]], str], skip_ids: Iterable[int] = ()) -> None:
        self._decode = decode
        self._skip = frozenset(skip_ids)
        self._window: list[int] = []  # the tokens of the last chunk shown, then the ones held back
        self._num_shown = 0  # how many of the window's tokens are shown
        self._shown_text = ""  # decode(window[:num_shown])

    @classmethod
    def resume(
        cls, decode: Callable[[list[int]], str], skip_ids: Iterable[int], shown: list[int], held: list[int]
    ) -> WindowDetokenizer:
        """Carry on after another detokeniser showed the text of `shown` and holds `held`."""
        detok = cls(decode, skip_ids)
        detok._window, detok._num_shown = shown + held, len(shown)
        detok._shown_text = decode(shown) if shown else ""
        return detok

    def push(self, token_id: int) -> str:
        if token_id in self._skip:
            return ""
        self._window.append(token_id)
        text = self._decode(self._window)
        if len(text) <= len(self._shown_text) or text.endswith(REPLACEMENT):
            return ""
        new = text[len(self._shown_text) :]
        self._window = self._window[self._num_shown :]  # the chunk just shown is the next context
        self._num_shown = len(self._window)
        self._shown_text = self._decode(self._window)
        return new

    def flush(self) -> str:
        if self._num_shown == len(self._window):
            return ""
        text = self._decode(self._window)
        return text[len(self._shown_text) :]


class StreamDetokenizer:
    """`tokenizers`' own streaming decoder (``DecodeStream``, in Rust) for a fast tokenizer.

    It keeps no record of the tokens it holds back, so this class does, for `flush`. Should the
    stream refuse a token (a decoder whose text is not a prefix of its longer text), the rest of the
    sequence goes through a `WindowDetokenizer` from the same point.
    """

    def __init__(self, tokenizer: Any, skip_ids: Iterable[int] = ()) -> None:
        from tokenizers.decoders import DecodeStream

        self._tokenizer = tokenizer  # a tokenizers.Tokenizer (a fast tokenizer's backend_tokenizer)
        self._skip = frozenset(skip_ids)
        self._stream: Any = DecodeStream(skip_special_tokens=False)
        self._fallback: WindowDetokenizer | None = None
        self._shown: list[int] = []  # tokens of the last chunk shown
        self._held: list[int] = []  # tokens pushed since

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def push(self, token_id: int) -> str:
        if self._fallback is not None:
            return self._fallback.push(token_id)
        if token_id in self._skip:
            return ""
        try:
            chunk = self._stream.step(self._tokenizer, token_id)
        except Exception:  # noqa: BLE001 - the decoder refused this token: decode windows from here on
            self._fallback = WindowDetokenizer.resume(self._decode, self._skip, self._shown, self._held)
            return self._fallback.push(token_id)
        self._held.append(token_id)
        if not chunk:
            return ""
        self._shown, self._held = self._held, []
        return chunk

    def flush(self) -> str:
        if self._fallback is not None:
            return self._fallback.flush()
        if not self._held:
            return ""
        return WindowDetokenizer.resume(self._decode, (), self._shown, self._held).flush()


def special_token_ids(tokenizer: Any) -> frozenset[int]:
    """The ids that ``decode(..., skip_special_tokens=True)`` leaves out."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
    return frozenset(getattr(tokenizer, "all_special_ids", ()))


def detokenizer_for(tokenizer: Any, special_ids: frozenset[int] | None = None) -> Detokenizer:
    """The streaming decoder for a fast tokenizer whose text is its decoder's alone; windows of
    ``tokenizer.decode`` otherwise (slow tokenizers, or the clean-up of spaces transformers adds)."""
    special = special_token_ids(tokenizer) if special_ids is None else special_ids
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not _cleans_up_spaces(tokenizer):
        return StreamDetokenizer(backend, special)
    return WindowDetokenizer(lambda ids: tokenizer.decode(ids, skip_special_tokens=True), special)


def _cleans_up_spaces(tokenizer: Any) -> bool:
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    # transformers skips the clean-up for BPE models unless told to corrupt their output anyway
    backend = tokenizer.backend_tokenizer
    forced = getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
    return type(backend.model).__name__ != "BPE" or bool(forced)
