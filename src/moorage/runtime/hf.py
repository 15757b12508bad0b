"""Task handlers for real models: sentence-transformers and transformers (extra ``[ml]``).

Weights are only ever read from safetensors (``use_safetensors=True``): the registry refuses
pickle files at registration and the loader refuses them again before this module runs.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..config import RuntimeSettings
from ..errors import BadRequest, InvalidArtifact, Unprocessable, require
from ..registry.manifest import Manifest
from .base import (
    Classification,
    Constraint,
    GenerateInput,
    Generation,
    GenerationParams,
    NewSequence,
    StepGenerator,
    TaskHandler,
    TextStream,
    TokenLogprob,
    TopLogprob,
)
from .detokenize import Detokenizer, detokenizer_for, special_token_ids


def _torch(settings: RuntimeSettings):
    torch = require("torch", "ml")
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    return torch


def resolve_dtype(torch, settings: RuntimeSettings):
    """The torch dtype for `settings.dtype`; "auto" is bfloat16 where matmuls have native bf16
    (CPUs with AVX512-BF16 or AMX, CUDA devices that support it) and float32 elsewhere."""
    name = settings.dtype
    if name == "auto":
        name = "bfloat16" if _native_bf16(torch, settings.device) else "float32"
    return getattr(torch, name)


def _native_bf16(torch, device: str) -> bool:
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def precision_of(dtype) -> str:
    """A torch dtype's short name as /v1/models reports it: torch.bfloat16 -> "bf16"."""
    name = str(dtype).removeprefix("torch.")
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(name, name)


def _param_bytes(module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


class SentenceEmbedder(TaskHandler):
    """sentence-transformers folders keep their pooling and normalisation modules."""

    task = "embed"

    def load(self, folder: Path, manifest: Manifest, settings: RuntimeSettings) -> None:
        torch = _torch(settings)
        st = require("sentence_transformers", "ml")
        weights = transformer_folder(folder)
        with pruned_heads_quiet(weights):
            self.model = st.SentenceTransformer(
                str(folder),
                device=settings.device,
                local_files_only=True,
                model_kwargs={"use_safetensors": True, **pruned_heads_kwargs(weights)},
            )
        restore_pruned_heads(self.model[0].auto_model, weights)
        self.model.to(resolve_dtype(torch, settings)).eval()
        self.memory_bytes = _param_bytes(self.model)
        self.precision = precision_of(resolve_dtype(torch, settings))

    def preprocess(self, inputs: list[str]) -> Any:
        texts = [str(t) for t in inputs]
        prepare = getattr(self.model, "preprocess", None) or self.model.tokenize  # ST >= 6 : older
        return prepare(texts)

    def predict(self, batch: Any) -> list[Any]:
        torch = require("torch", "ml")
        features = {k: v.to(self.model.device) if hasattr(v, "to") else v for k, v in batch.items()}
        with torch.inference_mode():
            out = self.model.forward(features)["sentence_embedding"]
        return list(out.float().cpu().numpy())


class SequenceClassifier(TaskHandler):
    task = "classify"

    def load(self, folder: Path, manifest: Manifest, settings: RuntimeSettings) -> None:
        torch = _torch(settings)
        tf = require("transformers", "ml")
        self.tokenizer = tf.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        with pruned_heads_quiet(folder):
            model = tf.AutoModelForSequenceClassification.from_pretrained(
                str(folder),
                local_files_only=True,
                use_safetensors=True,
                dtype=resolve_dtype(torch, settings),
                **pruned_heads_kwargs(folder),
            )
        restore_pruned_heads(model, folder)
        self.model = model.to(settings.device).eval()
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        self.memory_bytes = _param_bytes(self.model)
        self.precision = precision_of(self.model.dtype)

    def preprocess(self, inputs: list[str]) -> Any:
        return self.tokenizer([str(t) for t in inputs], padding=True, truncation=True, return_tensors="pt")

    def predict(self, batch: Any) -> list[Classification]:
        torch = require("torch", "ml")
        with torch.inference_mode():
            logits = self.model(**{k: v.to(self.model.device) for k, v in batch.items()}).logits
        probs = torch.softmax(logits.float(), dim=-1).cpu().tolist()
        out = []
        for row in probs:
            best = max(range(len(row)), key=row.__getitem__)
            out.append(Classification(self.labels[best], row[best], dict(zip(self.labels, row))))
        return out


class CausalGenerator(StepGenerator):
    """Causal LMs driven one decode step at a time (continuous batching) over a shared KV cache."""

    def load(self, folder: Path, manifest: Manifest, settings: RuntimeSettings) -> None:
        self.torch = _torch(settings)
        tf = require("transformers", "ml")
        from . import decoding  # needs transformers

        self.tokenizer = tf.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        with int8_quiet(folder):
            model = tf.AutoModelForCausalLM.from_pretrained(
                str(folder), local_files_only=True, use_safetensors=True, dtype=resolve_dtype(self.torch, settings)
            )
        quantized = restore_int8_linears(model, folder)
        self.model = model.to(settings.device).eval()
        self.memory_bytes = _param_bytes(self.model)
        self.precision = "int8" if quantized else precision_of(self.model.dtype)
        decoding.use_decode_attention(self.model)
        eos = self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id
        self.eos_token_ids = frozenset(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)
        self.special_ids = special_token_ids(self.tokenizer)
        self.vocab_size = int(self.model.config.vocab_size)
        self._grammars: Any = None  # constraints.Grammars, made on the first constrained request

    @property
    def takes_tools(self) -> bool:
        """Whether the chat template has its own format for tool definitions (it reads `tools`)."""
        return "tools" in (self.tokenizer.chat_template or "")

    def render(self, item: GenerateInput) -> str:
        """The prompt text: chat messages go through the tokenizer's chat template when it has one,
        with the tools when the template shows them (a caller renders tools itself for one that does not)."""
        if item.messages is None:
            return item.prompt or ""
        if item.tools and not self.takes_tools:
            raise BadRequest("tools: this model's chat template has no format for tools", code="tools_unsupported")
        if self.tokenizer.chat_template:
            try:
                return self.tokenizer.apply_chat_template(
                    [_template_message(m) for m in item.messages],
                    tools=list(item.tools) if item.tools else None,
                    add_generation_prompt=True,
                    tokenize=False,
                )
            except Exception as exc:  # the template refuses these messages (e.g. roles out of order)
                raise BadRequest(
                    f"messages: the model's chat template refused them ({type(exc).__name__}: {str(exc)[:200]})",
                    code="invalid_messages",
                ) from None
        return "\n".join(f"{m['role']}: {m['content']}" for m in item.messages) + "\nassistant:"

    def encode_prompt(self, item: GenerateInput) -> list[int]:
        ids = self.tokenizer(self.render(item), add_special_tokens=False)["input_ids"]
        return ids or [self.tokenizer.bos_token_id or self.tokenizer.pad_token_id]

    def decode_tokens(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def new_detokenizer(self) -> Detokenizer:
        return detokenizer_for(self.tokenizer, self.special_ids)

    def new_batch(self) -> _DecodeBatch:
        return _DecodeBatch(self.model, self.torch, self.tokenizer.pad_token_id, self.grammars, self.token_text)

    def grammars(self) -> Any:
        """The constraints compiled for this tokenizer (the tokenizer's grammar tables are built once)."""
        if self._grammars is None:
            from .constraints import Grammars

            self._grammars = Grammars(self.tokenizer, self.vocab_size, sorted(self.eos_token_ids))
        return self._grammars

    def compile_constraint(self, constraint: Constraint) -> None:
        self.grammars().compile(constraint)

    def token_text(self, token_ids: list[int]) -> list[str]:
        """Each token's own text (a token may hold part of a character: then the replacement mark)."""
        return [self.tokenizer.decode([t]) for t in token_ids]

    def generate_static(self, items: list[GenerateInput]) -> list[Generation]:
        """transformers' own static batched `generate` (one params group): the baseline benchmarks compare to."""
        torch, params = self.torch, items[0].params
        enc = self.tokenizer(
            [self.render(i) for i in items], return_tensors="pt", padding=True, add_special_tokens=False
        )
        # only what a decoder takes: BERT-style tokenizers add token_type_ids that generate() refuses
        enc = {k: enc[k].to(self.model.device) for k in ("input_ids", "attention_mask")}
        if params.seed is not None:
            torch.manual_seed(params.seed)
        kwargs: dict[str, Any] = {"do_sample": params.temperature > 0}
        if params.temperature > 0:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        with torch.inference_mode():
            out = self.model.generate(
                **enc, max_new_tokens=params.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id, **kwargs
            )
        prompt_len = enc["input_ids"].shape[1]
        results = []
        for row, prompt_tokens in zip(out[:, prompt_len:].tolist(), enc["attention_mask"].sum(dim=1).tolist()):
            stream = TextStream(self, params, int(prompt_tokens))
            for token in row:
                stream.push(token)
                if stream.result is not None:
                    break
            if stream.result is None:  # every row stopped early and this one was padded: its end
                stream.finish("stop")
            results.append(stream.result)
        return [r for r in results if r is not None]


def _template_message(message: dict[str, Any]) -> dict[str, Any]:
    """A message as chat templates take it: tool call arguments as a mapping, not OpenAI's JSON text."""
    if not message.get("tool_calls"):
        return dict(message)
    calls = [
        {**call, "function": {**call["function"], "arguments": _arguments(call["function"]["arguments"])}}
        for call in message["tool_calls"]
    ]
    return {**message, "tool_calls": calls}


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # not JSON: the template shows it as it was sent


class _DecodeBatch:
    """Rows of running sequences, left-padded, over one KV cache of `GrowingLayer`s.

    New sequences are prefilled together (left padding, explicit position ids) and their cache is
    joined to the running one after padding both to the same length on the left; finished rows are
    dropped, then columns that are padding in every row are trimmed. A decode step writes one
    column of the cache in place and runs the one-token attention of `decoding()` under `attend`,
    the mask of real tokens over the buffers (padding and free columns left out).

    A row with a constraint has a grammar matcher: its logits are masked to the tokens the grammar
    allows before its token is chosen, and the matcher then accepts that token. Rows without one
    pay nothing for it, nor for logprobs unless they asked.
    """

    def __init__(self, model, torch, pad_id: int, grammars: Any = None, token_text: Any = None) -> None:
        from transformers.cache_utils import Cache

        from . import decoding

        self.model, self.torch, self.pad_id = model, torch, pad_id
        self.grammars, self.token_text = grammars, token_text  # () -> constraints.Grammars; ids -> texts
        self.new_cache, self.kv = Cache, decoding
        # transformers 5 renames `past_key_values` to `cache` (the old name warns, then goes away)
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        # The one-token attention takes the whole cache buffers in bf16/fp16 (their kernels copy a
        # slice of a buffer first) and the used columns in float32 (no work on free columns); other
        # attention functions get the used columns and build their masks from the real tokens'.
        self.own_attention = getattr(model.config, "_attn_implementation", None) == decoding.ATTENTION
        self.whole = self.own_attention and model.dtype in (torch.bfloat16, torch.float16)
        self.seq_ids: list[int] = []
        self.params: list[GenerationParams] = []
        self.generators: list[Any] = []
        self.matchers: list[Any] = []  # per row: its constraint's RowMatcher, or None
        self.logprobs: list[TokenLogprob | None] = []  # per row of the last add or step
        self.ends: list[int] = []  # per row: the step at which its max_new_tokens run out
        self.num_steps = 0
        self.cache: Any = None
        self.attend: Any = None  # (rows, cache capacity), bool: where each row has a real token
        self.length = 0  # cache columns in use
        self.positions: Any = None  # (rows,): position id of each row's next token
        self.last: Any = None  # (rows,): the token each row feeds to the next step
        self.forward_seconds = 0.0  # time inside the model's forward (the rest of a step is overhead)
        self.num_forwards = 0

    @property
    def mask(self):
        """(rows, cached length): 1 where a row has a real token."""
        return self.attend[:, : self.length]

    def add(self, seqs: list[NewSequence]) -> list[int]:
        torch = self.torch
        from transformers import DynamicCache

        width = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, width - len(seq.prompt_ids) :] = torch.tensor(seq.prompt_ids)
            mask[row, width - len(seq.prompt_ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        device = self.model.device
        with torch.inference_mode():
            out = self._forward(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                **{self.cache_arg: cache},
                use_cache=True,
                logits_to_keep=1,
            )
        new_params = [s.params for s in seqs]
        new_gens = [self._generator(p) for p in new_params]
        new_matchers = [self._matcher(p) for p in new_params]
        tokens = self._sample(out.logits[:, -1], new_params, new_gens, new_matchers)
        self.seq_ids += [s.seq_id for s in seqs]
        self.params += new_params
        self.generators += new_gens
        self.matchers += new_matchers
        self.ends += [self.num_steps + p.max_new_tokens for p in new_params]
        self._merge(cache, mask.bool(), mask.sum(-1), tokens)
        return tokens.tolist()

    def step(self) -> list[int]:
        torch = self.torch
        if self.length == self.attend.shape[1]:  # no free column left: make room for more
            self._hold(self.torch.arange(len(self.seq_ids)), 0)
        self.attend[:, self.length] = True
        used = self.attend[:, : self.length + 1]  # this step's column included
        mask = self.attend[:, None, None, :] if self.whole else used[:, None, None, :] if self.own_attention else used
        device = self.model.device
        with torch.inference_mode(), self.kv.decoding():
            out = self._forward(
                input_ids=self.last[:, None].to(device),
                attention_mask=mask.to(device),
                position_ids=self.positions[:, None].to(device),
                **{self.cache_arg: self.cache},
                use_cache=True,
            )
        self.length += 1
        self.num_steps += 1
        self.positions = self.positions + 1
        self.last = self._sample(out.logits[:, -1], self.params, self.generators, self.matchers)
        return self.last.tolist()

    def remove(self, seq_ids: set[int]) -> None:
        if not seq_ids:
            return
        keep = [row for row, seq_id in enumerate(self.seq_ids) if seq_id not in seq_ids]
        self.seq_ids = [self.seq_ids[r] for r in keep]
        self.params = [self.params[r] for r in keep]
        self.generators = [self.generators[r] for r in keep]
        self.matchers = [self.matchers[r] for r in keep]
        self.ends = [self.ends[r] for r in keep]
        if not keep:
            self.cache = self.attend = self.positions = self.last = None
            self.length = 0
            return
        index = self.torch.tensor(keep, dtype=self.torch.long)
        self.positions, self.last = self.positions[index], self.last[index]
        # columns that are padding in every remaining row cost attention time for nothing
        used = self.mask[index].sum(0).nonzero()
        self._hold(index, int(used[0]) if len(used) else 0)

    def _hold(self, rows, first: int) -> None:
        """Keep these rows of the cache and mask, from column `first` on, with fresh free columns."""
        mask = self.mask[rows, first:]
        self.length = mask.shape[1]
        room = self._room()
        self.attend = self.torch.cat([mask, mask.new_zeros((len(mask), room))], dim=1)
        device_rows = rows.to(self.model.device)
        for layer in self.cache.layers:
            layer.hold(layer.keys[device_rows, :, first:], layer.values[device_rows, :, first:], room)

    def _room(self) -> int:
        """Free columns to add: half the cache again (at least a few), no more than any row can use."""
        wanted = max(self.kv.MIN_ROOM, self.length // 2)
        return max(1, min(wanted, max(self.ends) - self.num_steps + 1))

    def _merge(self, cache, mask, positions, tokens) -> None:
        torch = self.torch
        if self.cache is None:
            self.positions, self.last, self.length = positions, tokens, mask.shape[1]
            room = self._room()
            self.attend = torch.cat([mask, mask.new_zeros((len(mask), room))], dim=1)
            self.cache = self.new_cache(
                layers=[self.kv.GrowingLayer(k.keys, k.values, room, self.whole) for k in cache.layers]
            )
            return
        old_len, new_len = self.length, mask.shape[1]
        width = max(old_len, new_len)

        def pad(t, length):  # left-pad dimension -2 (cache) or -1 (mask) with zeros
            if length == width:
                return t
            shape = list(t.shape)
            dim = -2 if t.dim() == 4 else -1
            shape[dim] = width - length
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        joined = torch.cat([pad(self.mask, old_len), pad(mask, new_len)], dim=0)
        self.positions = torch.cat([self.positions, positions])
        self.last = torch.cat([self.last, tokens])
        self.length = width
        room = self._room()
        self.attend = torch.cat([joined, joined.new_zeros((len(joined), room))], dim=1)
        for old_layer, new_layer in zip(self.cache.layers, cache.layers):
            keys = torch.cat([pad(old_layer.keys, old_len), pad(new_layer.keys, new_len)], dim=0)
            values = torch.cat([pad(old_layer.values, old_len), pad(new_layer.values, new_len)], dim=0)
            old_layer.hold(keys, values, room)

    def _forward(self, **inputs):
        started = time.perf_counter()
        out = self.model(**inputs)
        self.forward_seconds += time.perf_counter() - started
        self.num_forwards += 1
        return out

    def _generator(self, params: GenerationParams):
        if params.temperature <= 0 or params.seed is None:
            return None
        return self.torch.Generator().manual_seed(params.seed)

    def _matcher(self, params: GenerationParams):
        if params.constraint is None:
            return None
        if self.grammars is None:
            raise Unprocessable("parameters: this model cannot enforce constraints", code="invalid_parameters")
        return self.grammars().matcher(params.constraint)

    def _sample(self, logits, params: list[GenerationParams], generators: list[Any], matchers: list[Any]):
        """Greedy rows take the argmax; sampling rows apply temperature and nucleus (top-p) filtering;
        constrained rows choose among the tokens their grammar allows. Sets `self.logprobs`."""
        tokens = logits.max(dim=-1).indices.cpu()  # argmax's first maximum, a few times faster on CPUs
        constrained = [row for row, m in enumerate(matchers) if m is not None]
        masked = self._masked(logits, constrained, matchers)
        if masked is not None:
            tokens[constrained] = masked.max(dim=-1).indices.cpu()
        where = {row: i for i, row in enumerate(constrained)}
        for row, (p, gen) in enumerate(zip(params, generators)):
            if p.temperature > 0:
                row_logits = masked[where[row]] if row in where else logits[row].float()
                tokens[row] = self._draw(row_logits.cpu(), p, gen)
        for row in constrained:
            matchers[row].accept(int(tokens[row]))
        self.logprobs = self._logprobs(logits, params, tokens)
        return tokens

    def _masked(self, logits, rows: list[int], matchers: list[Any]):
        """Float32 copies of these rows' logits with every token their grammar refuses at -inf."""
        if not rows:
            return None
        from .constraints import allocate_bitmask, apply_bitmask

        masked = logits[rows].float()
        bitmask = allocate_bitmask(len(rows), masked.shape[-1])
        for i, row in enumerate(rows):
            matchers[row].fill(bitmask, i)
        apply_bitmask(masked, bitmask)
        return masked

    def _draw(self, logits, p: GenerationParams, gen):
        torch = self.torch
        probs = torch.softmax(logits / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > p.top_p
            probs[order[outside]] = 0.0
        return torch.multinomial(probs, 1, generator=gen)[0]

    def _logprobs(self, logits, params: list[GenerationParams], tokens) -> list[TokenLogprob | None]:
        """The chosen tokens' logprobs and the k best alternatives, for the rows that asked: the
        model's own distribution at this step (log-softmax of its logits, before temperature, top-p
        and a grammar's mask, as vLLM reports them), so a greedy row's token is its best."""
        out: list[TokenLogprob | None] = [None] * len(params)
        rows = [row for row, p in enumerate(params) if p.logprobs is not None]
        if not rows:
            return out
        torch = self.torch
        logprobs = torch.log_softmax(logits[rows].float(), dim=-1).cpu()
        chosen = tokens[rows]
        chosen_lp = logprobs.gather(1, chosen[:, None])[:, 0].tolist()
        k = max(params[row].logprobs or 0 for row in rows)
        top_lp, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], chosen[:, None][:, :0])
        for i, row in enumerate(rows):
            n = params[row].logprobs or 0
            ids = top_ids[i, :n].tolist()
            texts = self.token_text([int(chosen[i]), *ids]) if self.token_text else [""] * (n + 1)
            top = tuple(TopLogprob(t, text, lp) for t, text, lp in zip(ids, texts[1:], top_lp[i, :n].tolist()))
            out[row] = TokenLogprob(int(chosen[i]), texts[0], chosen_lp[i], top)
        return out


# ---- encoders whose attention heads were pruned (moorage compress --method prune-heads) -------------
# transformers 5 dropped `prune_heads`: a BERT-like attention layer's head size is always hidden_size /
# num_attention_heads, so a layer with fewer heads cannot be built from the config alone. A pruned
# folder keeps the parent's num_attention_heads and names the removed heads in config.json's
# `pruned_heads` ({layer: [head, ...]}, the field transformers 4 applied at load); its weights hold only
# the kept heads' rows of Q/K/V and columns of the output projection. Loading builds the full model
# (the mismatched projections left to this hook), cuts those layers and reads their weights again.


def transformer_folder(folder: Path) -> Path:
    """Where a sentence-transformers folder keeps its transformer's config and weights."""
    try:
        modules = json.loads((folder / "modules.json").read_text())
    except (OSError, ValueError):
        return folder
    for module in modules:
        if str(module.get("type", "")).endswith("Transformer"):
            return folder / str(module.get("path", ""))
    return folder


def pruned_heads(folder: Path) -> dict[int, list[int]]:
    """Layer -> the heads removed from it, as config.json records them ({} for an unpruned model)."""
    try:
        recorded = json.loads((folder / "config.json").read_text()).get("pruned_heads") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    return {int(layer): sorted(int(h) for h in heads) for layer, heads in recorded.items() if heads}


def pruned_heads_kwargs(folder: Path) -> dict[str, Any]:
    """from_pretrained's arguments for the folder: a pruned one loads its cut projections afterwards."""
    return {"ignore_mismatched_sizes": True} if pruned_heads(folder) else {}


@contextlib.contextmanager
def pruned_heads_quiet(folder: Path) -> Iterator[None]:
    """transformers' load report lists a pruned folder's projections as mismatched: they are loaded by
    `restore_pruned_heads`, so the report is not printed."""
    with _transformers_quiet(bool(pruned_heads(folder))):
        yield


def cut_heads(attention, heads: list[int], torch) -> None:
    """Remove `heads` from a BERT-like attention block (``.self.query/key/value``, ``.output.dense``):
    their rows of Q, K and V and their columns of the output projection. What is left computes
    exactly what the full block computes with those heads' outputs masked to zero."""
    self_attention = attention.self
    size = int(self_attention.attention_head_size)
    kept = [h for h in range(int(self_attention.num_attention_heads)) if h not in set(heads)]
    index = torch.cat([torch.arange(h * size, (h + 1) * size) for h in kept]) if kept else torch.zeros(0).long()

    def cut(linear, dim: int):
        weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device))
        bias = linear.bias
        if bias is not None and dim == 0:
            bias = bias.detach().index_select(0, index.to(bias.device))
        out = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        out = out.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            out.weight.copy_(weight)
            if bias is not None:
                out.bias.copy_(bias)
        return out

    for name in ("query", "key", "value"):
        setattr(self_attention, name, cut(getattr(self_attention, name), 0))
    attention.output.dense = cut(attention.output.dense, 1)
    self_attention.num_attention_heads = len(kept)
    self_attention.all_head_size = len(kept) * size


def restore_pruned_heads(model, folder: Path) -> None:
    """Cut the pruned layers of a model loaded from `folder` and load their weights from the folder's
    safetensors (nothing happens for an unpruned folder)."""
    pruned = pruned_heads(folder)
    if not pruned:
        return
    torch = require("torch", "ml")
    from safetensors import safe_open

    base = getattr(model, "base_model", model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if layers is None or max(pruned) >= len(layers) or not hasattr(layers[0], "attention"):
        raise InvalidArtifact(f"{folder.name}: config.json names pruned heads of a model that has no such layers")
    for layer, heads in pruned.items():
        cut_heads(layers[layer].attention, heads, torch)
    wanted = {n: p for n, p in model.named_parameters() if _in_pruned_layer(n, pruned)}
    found: set[str] = set()
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors file is not a mapping)
                for name in (key, prefix + key, key.removeprefix(prefix)):
                    if name in wanted and name not in found:
                        tensor = f.get_tensor(key)
                        if tensor.shape != wanted[name].shape:
                            raise InvalidArtifact(
                                f"{folder.name}: {key} has shape {tuple(tensor.shape)}, "
                                f"its pruned heads need {tuple(wanted[name].shape)}"
                            )
                        with torch.no_grad():
                            wanted[name].copy_(tensor)
                        found.add(name)
    if missing := sorted(set(wanted) - found):
        raise InvalidArtifact(f"{folder.name}: the weights of pruned layers are missing ({missing[0]}, ...)")


def _in_pruned_layer(name: str, pruned: dict[int, list[int]]) -> bool:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layer" and parts[i + 1].isdigit() and int(parts[i + 1]) in pruned:
            rest = parts[i + 2 :]
            return rest[:2] in (["attention", "self"], ["attention", "output"]) and "LayerNorm" not in rest
    return False


# ---- int8 weight-only linear layers (moorage compress --method lm-int8) -----------------------------
# config.json's `moorage_int8` names the linear layers whose weights the folder holds as int8 (their
# usual names and shapes) with one scale per output channel beside each (NAME.weight_scale). transformers
# loads the int8 values into the float model (exactly: they are integers below 128) and leaves the scales
# out; the layers are then swapped for `Int8Linear`s that keep the weights as int8.
INT8_KEY = "moorage_int8"
INT8_KERNEL_ROWS = 8  # up to this many rows (decode steps) the int8 kernel; more (prefill) bf16 matmuls


def int8_config(folder: Path) -> dict[str, Any] | None:
    try:
        recorded = json.loads((folder / "config.json").read_text()).get(INT8_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return recorded if isinstance(recorded, dict) else None


@contextlib.contextmanager
def int8_quiet(folder: Path) -> Iterator[None]:
    """transformers' load report lists the int8 scales as unexpected: they are read by `restore_int8_linears`."""
    with _transformers_quiet(int8_config(folder) is not None):
        yield


@contextlib.contextmanager
def _transformers_quiet(quiet: bool) -> Iterator[None]:
    if not quiet:
        yield
        return
    tf = require("transformers", "ml")
    verbosity = tf.logging.get_verbosity()
    tf.logging.set_verbosity_error()
    try:
        yield
    finally:
        tf.logging.set_verbosity(verbosity)


@functools.cache
def int8_linear(torch):
    """The Int8Linear module class (made once torch is imported)."""
    module: Any = torch.nn.Module

    class Int8Linear(module):
        """y = x W^T + b with W = q * scale: q int8 (out, in), one float scale per output channel. A few
        rows run torch's int8 weight kernel (_weight_int8pack_mm) on bf16 activations; more rows (a
        prompt's prefill, a large decode batch) one bf16 matmul over q, which is faster there."""

        def __init__(self, weight, scale, bias) -> None:
            super().__init__()
            self.in_features, self.out_features = int(weight.shape[1]), int(weight.shape[0])
            self.register_buffer("weight", weight.to(torch.int8).contiguous())
            self.register_buffer("weight_scale", scale.to(torch.bfloat16).contiguous())
            self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)

        def forward(self, x):
            rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
            scale = self.weight_scale.to(torch.bfloat16)
            if rows.shape[0] <= INT8_KERNEL_ROWS:
                y = torch._weight_int8pack_mm(rows, self.weight, scale)
            else:  # the int8 values are exact in bf16; the scales apply to the output columns
                y = torch.nn.functional.linear(rows, self.weight.to(torch.bfloat16)) * scale
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    return Int8Linear


def restore_int8_linears(model, folder: Path) -> bool:
    """Swap the layers `moorage_int8` names for Int8Linears with the folder's scales; False for a folder
    without int8 layers."""
    recorded = int8_config(folder)
    if recorded is None:
        return False
    torch = require("torch", "ml")
    from safetensors import safe_open

    scales = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            scales.update({k: f.get_tensor(k) for k in f.keys() if k.endswith(".weight_scale")})  # noqa: SIM118
    linear = int8_linear(torch)
    for name in recorded.get("modules", []):
        scale = scales.get(f"{name}.weight_scale")
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        old = getattr(owner, attr, None)
        if scale is None or not isinstance(old, torch.nn.Linear):
            raise InvalidArtifact(f"{folder.name}: int8 layer {name} has no scale or is not a linear layer")
        setattr(owner, attr, linear(old.weight.detach().round(), scale, old.bias))
    return True
