"""Distilling step-by-step (Hsieh et al. 2023, arXiv:2305.02301): the teacher explains, the student learns both.

The teacher is asked for a rationale ending in an answer line; each kept record becomes two training tasks
told apart by a prompt prefix: `label_prefix + prompt -> answer` and `rationale_prefix + prompt -> rationale`.
The loss is alpha * (label task) + (1 - alpha) * (rationale task), each a mean over its own tokens: tokens
carry the weights alpha * N / N_label and (1 - alpha) * N / N_rationale (N: all trained tokens), so that the
loop's per-token normalisation gives exactly that mix over the dataset. At inference the student gets the plain
prompt (the default label prefix is empty) and answers without writing a rationale: the rationale is training
signal only. Teacher texts are generated once (greedy) and cached; those whose answer disagrees with the
data's are dropped when `require_correct` holds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from lmforge import config as config_io
from lmforge.data.chat import chat_prompt
from lmforge.distill.signals import generate, read_jsonl_cache, write_jsonl_cache
from lmforge.errors import UserError

log = logging.getLogger("lmforge.distill")
ANSWER_MARK = "Answer:"


@dataclass(frozen=True)
class RationaleSettings:
    """Distilling step-by-step: teacher rationales as a second training task."""

    enabled: bool = False
    """Ask the teacher for rationales and train the student on answers and rationales."""
    alpha: float = 0.5
    """Share of the loss on the label task (the rationale task gets 1 - alpha)."""
    instruction: str = (
        "Explain step by step how to get the answer, then give it on a last line starting with 'Answer:'."
    )
    """Appended to each prompt when the teacher writes its rationale."""
    label_prefix: str = ""
    """Prefix of the label task's prompts (empty: plain prompts, as the student is used)."""
    rationale_prefix: str = "[rationale] "
    """Prefix of the rationale task's prompts."""
    max_new_tokens: int = 128
    """Longest rationale the teacher writes."""
    require_correct: bool = True
    """Drop rationales whose final answer differs from the data's completion."""

    def __post_init__(self) -> None:
        """Refuse values with no meaning when the config is read, before any model loads."""
        config_io.within(self, "alpha", 0, 1)
        config_io.at_least(self, "max_new_tokens", 1)


def parse(text: str) -> tuple[str, str | None]:
    """(rationale, answer) from a teacher text ending in 'Answer: ...'; answer None without that line."""
    if ANSWER_MARK not in text:
        return text.strip(), None
    head, _, tail = text.rpartition(ANSWER_MARK)
    return head.strip(), (tail.strip().splitlines() or [""])[0].strip()


def rationale_records(
    teacher, tokenizer, records: list[dict], settings: RationaleSettings, path: Path, key: str
) -> tuple[list[dict], list[dict]]:
    """(label-task records, rationale-task records) from the teacher's rationales (written once, cached)."""
    if not 0 <= settings.alpha <= 1:
        raise UserError(f"rationale.alpha must be in [0, 1], got {settings.alpha}")
    texts = read_jsonl_cache(path, key)
    if texts is None:
        prompts = [chat_prompt(tokenizer, f"{r['prompt']}\n{settings.instruction}") for r in records]
        encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        log.info("step-by-step: the teacher writes %d rationales (once, cached in %s)", len(encoded), path)
        out = generate(teacher, encoded, settings.max_new_tokens, tokenizer.pad_token_id, tokenizer.eos_token_id, False)
        texts = [{"text": tokenizer.decode(tokens, skip_special_tokens=True)} for tokens, _ in out]
        write_jsonl_cache(path, key, texts)
    labels, rationales, wrong = [], [], 0
    for record, item in zip(records, texts, strict=True):
        rationale, answer = parse(item["text"])
        gold = record.get("completion")
        if settings.require_correct and (answer is None or gold is None or answer != gold.strip()):
            wrong += 1
            continue
        if not rationale:
            wrong += 1
            continue
        labels.append({"prompt": settings.label_prefix + record["prompt"], "completion": gold or answer})
        rationales.append({"prompt": settings.rationale_prefix + record["prompt"], "completion": rationale})
    log.info("step-by-step: kept %d of %d teacher rationales (%d wrong or empty)", len(labels), len(records), wrong)
    if not labels:
        raise UserError(
            "no teacher rationale was usable (none ended in a correct 'Answer:' line): set "
            "rationale.require_correct: false, or change rationale.instruction"
        )
    return labels, rationales


def weigh(label_rows: list[dict], rationale_rows: list[dict], alpha: float) -> list[dict]:
    """Both tasks' rows with per-row token weights so the per-token mean is alpha*label + (1-alpha)*rationale."""

    def tokens(rows: list[dict]) -> int:
        return sum(sum(label != -100 for label in row["labels"][1:]) for row in rows)

    n_label, n_rationale = tokens(label_rows), tokens(rationale_rows)
    total = n_label + n_rationale
    w_label = alpha * total / max(n_label, 1)
    w_rationale = (1 - alpha) * total / max(n_rationale, 1)
    return [row | {"weight": w_label} for row in label_rows] + [row | {"weight": w_rationale} for row in rationale_rows]
