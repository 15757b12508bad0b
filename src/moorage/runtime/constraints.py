"""Structured outputs: a `Constraint` enforced while decoding, one matcher per row (extra ``[ml]``).

The grammar library is xgrammar. Measured with ``bench/grammars.py`` on SmolLM2's tokenizer
(49,152 tokens) beside llguidance and outlines-core, for a schema with strings, an enum, a bounded
integer and an array: xgrammar compiles it in ~18 ms (outlines-core: ~7.5 s, as it builds the whole
token automaton up front), fills a row's allowed-token bitmask in ~0.03 ms (0.5 ms for 32 rows;
llguidance 5.5 ms) and applies it to the logits with a CPU kernel, adds ~8 MB (llguidance and
outlines-core ~200 MB), and raises at compile time for a schema or regular expression it cannot
take. llguidance's torch helpers import triton; xgrammar's CPU path loads neither triton nor CUDA.

- `check(constraint)` builds the grammar without a tokenizer, so parameters are refused (422) at
  the edge before any model is touched; `Grammars` compiles it for one tokenizer, once per
  constraint (a bounded LRU), and hands out a `RowMatcher` per sequence.
- JSON is generated compactly (``", "`` and ``": "`` between items, no other whitespace): a free
  choice of whitespace lets a model loop on blanks until its token budget runs out. A JSON
  schema is compiled in strict mode, as OpenAI's ``strict: true``: properties and items the schema
  does not declare are not generated unless it allows them (``additionalProperties``).
- The end-of-sequence tokens are allowed only where the grammar may end, so a constrained row ends
  with "stop" once its text is complete, or "length" when its token budget ran out first.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from functools import lru_cache
from typing import Any

from ..errors import Unprocessable, require
from .base import Constraint

GRAMMAR_CACHE_SIZE = 64  # compiled grammars kept per tokenizer (a few MB at most each)
KINDS = ("json_object", "json_schema", "regex", "choice")
_JSON_OBJECT = '{"type": "object"}'


def _xgrammar():
    return require("xgrammar", "structured")


def grammar_of(constraint: Constraint) -> Any:
    """The tokenizer-free grammar of a constraint; ValueError (saying what is wrong) when the library
    cannot take it."""
    xgr = _xgrammar()
    try:
        if constraint.kind == "json_object":
            return xgr.Grammar.from_json_schema(_JSON_OBJECT, any_whitespace=False, strict_mode=False)
        if constraint.kind == "json_schema":
            return xgr.Grammar.from_json_schema(constraint.spec, any_whitespace=False, strict_mode=True)
        if constraint.kind == "regex":
            return xgr.Grammar.from_regex(constraint.spec)
        if constraint.kind == "choice":
            choices = json.loads(constraint.spec)
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))
    except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar's parse errors are RuntimeErrors
        raise ValueError(_message(exc)) from None
    raise ValueError(f"unknown constraint kind {constraint.kind!r}; one of {', '.join(KINDS)}")


@lru_cache(maxsize=GRAMMAR_CACHE_SIZE)
def check(constraint: Constraint) -> None:
    """Raise ValueError when `constraint` cannot be compiled (cached: the same request costs once)."""
    grammar_of(constraint)


def _message(exc: BaseException) -> str:
    """xgrammar's message without its source location prefix ("[time] file.cc:line: ")."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    _, sep, rest = text.partition(": ")
    return (rest if sep and ".cc:" in text.split(": ")[0] else text)[:300]


class RowMatcher:
    """One sequence's position in its grammar: the tokens allowed next, accepting the chosen one."""

    def __init__(self, compiled: Any) -> None:
        self._matcher = _xgrammar().GrammarMatcher(compiled)

    def fill(self, bitmask: Any, row: int) -> None:
        """Write this row's allowed tokens into `bitmask[row]` (one bit per token)."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        """Advance past `token`; False when the grammar does not allow it there (then nothing moves)."""
        return bool(self._matcher.accept_token(token))

    @property
    def is_finished(self) -> bool:
        """The grammar accepted an end-of-sequence token."""
        return bool(self._matcher.is_terminated())


class Grammars:
    """Constraints compiled for one tokenizer: a bounded LRU of compiled grammars, matchers per row.

    `stop_token_ids` are the model's end-of-sequence tokens: the only tokens allowed once a text is
    complete. Thread-safe (an engine thread compiles; a benchmark or a test may compile meanwhile)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int], max_size: int = GRAMMAR_CACHE_SIZE):
        xgr = _xgrammar()
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.vocab_size = vocab_size
        self.max_size = max_size
        self._compiled: OrderedDict[Constraint, Any] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, constraint: Constraint) -> Any:
        """The compiled grammar (cached); 422 `invalid_parameters` when it cannot be compiled."""
        with self._lock:
            compiled = self._compiled.get(constraint)
            if compiled is not None:
                self._compiled.move_to_end(constraint)
                return compiled
        try:
            compiled = self._compiler.compile_grammar(grammar_of(constraint))
        except (RuntimeError, ValueError) as exc:
            raise Unprocessable(
                f"parameters: the {constraint.kind} constraint cannot be compiled: {_message(exc)}",
                code="invalid_parameters",
            ) from None
        with self._lock:
            self._compiled[constraint] = compiled
            while len(self._compiled) > self.max_size:
                self._compiled.popitem(last=False)
        return compiled

    def __len__(self) -> int:
        return len(self._compiled)

    def matcher(self, constraint: Constraint) -> RowMatcher:
        return RowMatcher(self.compile(constraint))


def allocate_bitmask(rows: int, vocab_size: int) -> Any:
    return _xgrammar().allocate_token_bitmask(rows, vocab_size)


def apply_bitmask(logits: Any, bitmask: Any) -> None:
    """Set the logits of disallowed tokens to -inf, in place; `logits` (rows, vocab) float32."""
    _xgrammar().apply_token_bitmask_inplace(logits, bitmask)
