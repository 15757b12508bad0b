"""Grammar libraries for constrained decoding, side by side on SmolLM2's tokenizer (49,152 tokens).

    python bench/grammars.py [--home DIR] [--steps 64] [--libraries xgrammar,llguidance,outlines-core]

For xgrammar, llguidance and outlines-core, with the same tokenizer and the same JSON Schema (an
object with strings, an enum, a bounded integer and an array):
  - the tokenizer set-up time (once per model) and the schema's compile time (once per schema),
  - the time to fill the allowed-token bitmask per decode step, at 1 and 32 rows, walking a
    valid JSON text of the schema token by token (the mask, then accepting the token),
  - the resident memory the library added (tokenizer + compiled grammar + 32 matchers),
  - what an invalid schema and an invalid regular expression do (an error at compile time is
    what the serving layer needs to answer 422 before any row runs),
  - whether importing and using it loaded triton or initialised CUDA (it must run on CPUs alone).
Each library runs in a child process of its own, so their memory and imports do not mix; each
child is bounded by a timeout. The header names the CPU, its ISA flags, torch and its threads.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "city": {"type": "string", "maxLength": 40},
        "mood": {"type": "string", "enum": ["happy", "sad", "calm", "angry"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
    },
    "required": ["name", "city", "mood", "age", "tags"],
    "additionalProperties": False,
}
VALID = {"name": "Ada Lovelace", "city": "London", "mood": "calm", "age": 36, "tags": ["maths", "engines", "poetry"]}
BAD_SCHEMA = {"type": "object", "properties": {"a": {"type": "no-such-type"}}}
BAD_REGEX = "[a-z"
LIBRARIES = ("xgrammar", "llguidance", "outlines-core")
ROWS = (1, 32)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn, *args):
    started = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - started


def _error_of(fn) -> str:
    try:
        fn()
    except Exception as exc:  # what the library raises is what we measure
        return f"raises {type(exc).__name__}: {str(exc).splitlines()[0][:70]}"
    return "accepted (no error)"


class XGrammar:
    def __init__(self, tokenizer, vocab_size: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.vocab_size = vocab_size

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(json.dumps(schema), strict_mode=True)

    def compile_regex(self, pattern: str):
        return self.compiler.compile_regex(pattern)

    def matchers(self, compiled, n: int):
        return [self.xgr.GrammarMatcher(compiled) for _ in range(n)]

    def bitmask(self, n: int):
        return self.xgr.allocate_token_bitmask(n, self.vocab_size)

    def fill(self, matcher, bitmask, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, matcher, token: int) -> bool:
        return matcher.accept_token(token)

    def apply(self, logits, bitmask) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, bitmask)


class LLGuidance:
    def __init__(self, tokenizer, vocab_size: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll, self.lt = llguidance, llguidance.torch
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.vocab_size = vocab_size

    def compile(self, schema: dict):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        matcher = self.ll.LLMatcher(self.tokenizer, grammar)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return grammar

    def compile_regex(self, pattern: str):
        grammar = self.ll.LLMatcher.grammar_from_regex(pattern)
        matcher = self.ll.LLMatcher(self.tokenizer, grammar)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return grammar

    def matchers(self, compiled, n: int):
        return [self.ll.LLMatcher(self.tokenizer, compiled) for _ in range(n)]

    def bitmask(self, n: int):
        return self.lt.allocate_token_bitmask(n, self.vocab_size)

    def fill(self, matcher, bitmask, row: int) -> None:
        self.lt.fill_next_token_bitmask(matcher, bitmask, row)

    def accept(self, matcher, token: int) -> bool:
        return matcher.consume_token(token)

    def apply(self, logits, bitmask) -> None:
        self.lt.apply_token_bitmask_inplace(logits, bitmask)


class OutlinesCore:
    def __init__(self, tokenizer, vocab_size: int) -> None:
        import outlines_core

        self.oc = outlines_core
        self.vocab_size = vocab_size
        decoder = _byte_decoder()
        tokens: dict[bytes, list[int]] = {}
        specials = set(tokenizer.all_special_ids)
        for token, token_id in tokenizer.get_vocab().items():
            if token_id in specials:
                continue
            raw = bytes(decoder[c] for c in token) if all(c in decoder for c in token) else token.encode()
            tokens.setdefault(raw, []).append(token_id)
        self.vocabulary = outlines_core.Vocabulary(tokenizer.eos_token_id, tokens)

    def compile(self, schema: dict):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocabulary)

    def compile_regex(self, pattern: str):
        return self.oc.Index(pattern, self.vocabulary)

    def matchers(self, compiled, n: int):
        return [self.oc.Guide(compiled) for _ in range(n)]

    def bitmask(self, n: int):
        import torch

        return torch.zeros((n, (self.vocab_size + 31) // 32), dtype=torch.int32)

    def fill(self, guide, bitmask, row: int) -> None:
        mask = bitmask[row]
        guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())

    def accept(self, guide, token: int) -> bool:
        guide.advance(token)
        return True

    def apply(self, logits, bitmask) -> None:
        import torch

        bits = (bitmask[..., None] >> torch.arange(32, dtype=torch.int32)) & 1
        allowed = bits.flatten(1)[:, : logits.shape[-1]].bool()
        logits.masked_fill_(~allowed, float("-inf"))


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet back to bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def measure(library: str, tokenizer_dir: str, steps: int) -> dict:
    """One library's numbers (runs in a child process)."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    vocab_size = len(tokenizer)
    base_rss = rss_mb()
    cls = {"xgrammar": XGrammar, "llguidance": LLGuidance, "outlines-core": OutlinesCore}[library]
    lib, setup_s = _timed(cls, tokenizer, vocab_size)
    compiled, compile_s = _timed(lib.compile, SCHEMA)
    _, recompile_s = _timed(lib.compile, {**SCHEMA, "title": "another"})
    tokens = tokenizer(json.dumps(VALID), add_special_tokens=False)["input_ids"][:steps]
    out = {
        "setup_ms": round(setup_s * 1000, 1),
        "compile_ms": round(compile_s * 1000, 1),
        "compile_again_ms": round(recompile_s * 1000, 1),
    }
    logits = torch.randn(max(ROWS), vocab_size)
    for rows in ROWS:
        matchers = lib.matchers(compiled, rows)
        bitmask = lib.bitmask(rows)
        fill_s = apply_s = 0.0
        for token in tokens:
            started = time.perf_counter()
            for row, m in enumerate(matchers):
                lib.fill(m, bitmask, row)
            filled = time.perf_counter()
            lib.apply(logits[:rows], bitmask)
            fill_s += filled - started
            apply_s += time.perf_counter() - filled
            for m in matchers:
                if not lib.accept(m, token):
                    raise SystemExit(f"{library} refused token {token} of a valid text")
        out[f"mask_ms_{rows}_rows"] = round(1000 * fill_s / len(tokens), 3)
        out[f"apply_ms_{rows}_rows"] = round(1000 * apply_s / len(tokens), 3)
    out["memory_mb"] = round(rss_mb() - base_rss, 1)
    out["bad_schema"] = _error_of(lambda: lib.compile(BAD_SCHEMA))
    out["bad_regex"] = _error_of(lambda: lib.compile_regex(BAD_REGEX))
    out["steps"] = len(tokens)
    out["triton_loaded"] = any(m == "triton" or m.startswith("triton.") for m in sys.modules)
    out["cuda_initialised"] = bool(torch.cuda.is_initialized())
    return out


def header() -> str:
    import platform

    import torch

    flags, model = set(), platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return (
        f"cpu: {model} ({os.cpu_count()} cpus), isa: {' '.join(isa) or 'none'}\n"
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; logits float32"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", default=os.environ.get("MOORAGE_HOME", str(Path.home() / ".moorage")))
    parser.add_argument("--steps", type=int, default=64, help="decode steps walked per row count")
    parser.add_argument("--libraries", default=",".join(LIBRARIES))
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per library")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.tokenizer, args.steps)))
        return

    from moorage.config import load_settings
    from moorage.demo import assets

    settings = load_settings(environ={**os.environ, "MOORAGE_HOME": args.home})
    tokenizer_dir = str(assets.smollm2_folder(settings.cache_dir))
    print(header())
    print(f"tokenizer: SmolLM2-135M-Instruct; schema: {len(SCHEMA['properties'])} properties; {args.steps} steps")
    rows = {}
    for library in args.libraries.split(","):
        cmd = [sys.executable, __file__, "--child", library, "--tokenizer", tokenizer_dir, "--steps", str(args.steps)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            rows[library] = {"error": f"over {args.timeout:.0f} s"}
            continue
        lines = done.stdout.strip().splitlines()
        rows[library] = json.loads(lines[-1]) if done.returncode == 0 and lines else {"error": done.stderr[-300:]}
    keys = [k for k in next((r for r in rows.values() if "error" not in r), {}) if k not in ("bad_schema", "bad_regex")]
    print(f"{'':22s}" + "".join(f"{name:>16s}" for name in rows))
    for key in keys:
        print(f"{key:22s}" + "".join(f"{str(r.get(key, '-')):>16s}" for r in rows.values()))
    for key in ("bad_schema", "bad_regex", "error"):
        for name, r in rows.items():
            if key in r:
                print(f"{key} {name}: {r[key]}")


if __name__ == "__main__":
    main()
