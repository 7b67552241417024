"""Render records into token ids and labels with the tokenizer's own chat template.

Fine-tuning and evaluation share `chat_prompt`, so a model is scored on exactly the prompt layout it was
trained on. Loss masks cover the completion / assistant turns only by default: each assistant turn's
character span is found by rendering the conversation up to that turn with and without it, then the
full text is tokenised once with offsets and a token is trained when it starts inside a span [trl]. EOS is
always a trained label, even when pad == eos. A tokenizer without a chat template gets plain
concatenation (prompt, completion, EOS), as TRL does for non-conversational data.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.errors import UserError

IGNORE_INDEX = -100


@dataclass
class Example:
    """One tokenised training example: labels are IGNORE_INDEX where no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt(tokenizer, prompt: str, shots: list[tuple[str, str]] = ()) -> str:
    """The text a model sees before it answers `prompt`, with optional (prompt, answer) example turns."""
    if not has_chat_template(tokenizer):
        return "".join(f"{p}\n{a}\n\n" for p, a in shots) + f"{prompt}\n"
    messages = []
    for shot_prompt, shot_answer in shots:
        messages += [{"role": "user", "content": shot_prompt}, {"role": "assistant", "content": shot_answer}]
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_example(tokenizer, record: dict, max_length: int | None = None, train_on_prompt: bool = False) -> Example:
    """Tokenise a normalised record (see data.sources) into input ids and labels.

    Args:
        tokenizer: a fast Hugging Face tokenizer.
        record: text | prompt_completion | messages record.
        max_length: truncate to this many tokens (the example is flagged `truncated`).
        train_on_prompt: put loss on every token, not only on completions / assistant turns.
    """
    if "text" in record:
        text, spans = record["text"], [(0, len(record["text"]))]
    elif "messages" in record:
        text, spans = _render_messages(tokenizer, record["messages"])
    elif "completion" in record:
        messages = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["completion"]},
        ]
        text, spans = _render_messages(tokenizer, messages)
    else:
        raise UserError(f"cannot render a record with keys {sorted(record)}: preference records go to DPO")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    in_span = [_inside(start, spans) for start, _ in encoded["offset_mapping"]]
    # Decide on the EOS from the spans, not the labels: with train_on_prompt the template's trailing newline
    # is trained too, and an EOS appended after it would double the stop token.
    in_span_ids = [tok for tok, inside in zip(ids, in_span, strict=True) if inside]
    eos = tokenizer.eos_token_id
    if eos is not None and (not in_span_ids or in_span_ids[-1] != eos):  # the model must learn to stop
        ids.append(eos)
        in_span.append(True)
    labels = [tok if train_on_prompt or inside else IGNORE_INDEX for tok, inside in zip(ids, in_span, strict=True)]
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return Example(ids, labels, truncated)


def mask_runs(tokenizer, example: Example) -> list[tuple[str, bool]]:
    """The example's text as runs of (text, trained): consecutive tokens with the same mask decoded together,
    so a character split over tokens reads whole."""
    runs: list[tuple[list[int], bool]] = []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][1] == trained:
            runs[-1][0].append(token)
        else:
            runs.append(([token], trained))
    return [(tokenizer.decode(ids), trained) for ids, trained in runs]


def _inside(position: int, spans: list[tuple[int, int]]) -> bool:
    return any(start <= position < end for start, end in spans)


def _render_messages(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Full conversation text and the character spans of the assistant turns (content through EOS)."""
    if not has_chat_template(tokenizer):
        # Separators go between turns, never after the last: the EOS must follow the completion directly,
        # or the model is trained to stop only after a blank line it was never trained to write.
        text, spans, separator = "", [], ""
        for message in messages:
            text += separator
            if message["role"] == "assistant":
                spans.append((len(text), len(text) + len(message["content"])))
            text += message["content"]
            separator = "\n\n" if message["role"] == "assistant" else "\n"
        return text, spans
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not through.startswith(before):
            raise UserError("the tokenizer's chat template renders turns non-incrementally: pass --train-on-prompt")
        end = len(through)
        eos_text = tokenizer.eos_token or ""
        if eos_text and eos_text in through[len(before) :]:  # stop after the EOS, not on the newline after it
            end = through.index(eos_text, len(before)) + len(eos_text)
        spans.append((len(before), end))
    return tokenizer.apply_chat_template(messages, tokenize=False), spans
