"""Examples as the trainer feeds them to a model: token ids and labels per row, and the collator that
pads a batch of them. A classifier's label is its id in the label map; a language model learns the
tokens of a plain text, or what the assistant says in a conversation. Evaluations of a trained model
on other rows (the pipeline's test split) encode them the same way, so they score the same tokens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import require

if TYPE_CHECKING:
    from .datasets import Example

NOT_LEARNED = -100  # the label of a token the loss leaves out (transformers' ignore index)


def encode(
    task: str, tokenizer: Any, examples: Sequence[Example], label_map: dict[str, int], max_length: int
) -> list[dict[str, Any]]:
    if task == "classify":
        return encode_classify(tokenizer, examples, label_map, max_length)
    return encode_generate(tokenizer, examples, max_length)


def encode_classify(
    tokenizer: Any, examples: Sequence[Example], label_map: dict[str, int], max_length: int
) -> list[dict[str, Any]]:
    encoded = tokenizer([e.text for e in examples], truncation=True, max_length=max_length)
    return [
        {"input_ids": ids, "attention_mask": mask, "labels": label_map[str(e.label)]}
        for ids, mask, e in zip(encoded["input_ids"], encoded["attention_mask"], examples)
    ]


def encode_generate(tokenizer: Any, examples: Sequence[Example], max_length: int) -> list[dict[str, list[int]]]:
    """Token ids and labels (NOT_LEARNED for a token outside the loss) of each text or conversation. A
    conversation's loss is on what the assistant says (its turns' tokens, found by character offsets);
    plain text, a tokenizer without offsets or a template that does not render turn by turn learn
    every token."""
    rows = []
    for example in examples:
        if example.messages:
            text, spans = render_chat(tokenizer, [dict(m) for m in example.messages])
        else:
            text, spans = example.text, None
        if not tokenizer.is_fast:
            spans = None  # no character offsets to find the turns by
        encoded = tokenizer(
            text,
            truncation=True,
            max_length=max_length,
            add_special_tokens=not example.messages,  # a chat template writes its own
            return_offsets_mapping=spans is not None,
        )
        ids = encoded["input_ids"]
        labels = list(ids)
        if spans is not None:
            turns = spans
            labels = [t if _inside(span, turns) else NOT_LEARNED for t, span in zip(ids, encoded["offset_mapping"])]
            if all(label == NOT_LEARNED for label in labels):  # the assistant's turns were cut off: learn the rest
                labels = list(ids)
        rows.append({"input_ids": ids, "attention_mask": encoded["attention_mask"], "labels": labels})
    return rows


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]] | None]:
    """The conversation as the model reads it, and the character spans of the assistant's turns (None
    when the template does not render a conversation as the prefix of its continuation). A tokenizer
    without a chat template gets "role: content" lines, as the runtime renders them."""

    def render(upto: int, prompt: bool) -> str:
        if tokenizer.chat_template:
            return tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=prompt)
        turns = "".join(f"{m['role']}: {m['content']}\n" for m in messages[:upto])
        return turns + ("assistant: " if prompt else "")

    text = render(len(messages), False)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before, after = render(i, True), render(i + 1, False)
        if not (after.startswith(before) and text.startswith(after)):
            return text, None
        spans.append((len(before), len(after)))
    return text, spans


def _inside(token: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    start, end = token
    return end > start and any(a <= start < b for a, b in spans)


def collator(task: str, tokenizer: Any) -> Any:
    tf = require("transformers", "training")
    if task == "classify":
        return tf.DataCollatorWithPadding(tokenizer)
    return tf.DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=NOT_LEARNED)  # pads labels, not with pad ids
