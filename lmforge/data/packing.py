"""Pack short tokenised examples into rows of at most `max_length` tokens, without cross-contamination.

Rows are filled best-fit decreasing (longest example first, into the row with the least room that still fits
it), which wastes little space on the usual long-tailed length mix [Krell et al. 2021, "Efficient Sequence
Packing without Cross-contamination", arXiv:2107.02027]. Each example keeps its own position ids (they restart
at 0, so RoPE sees it as if alone) and its first label is IGNORE_INDEX, so nothing is predicted across a
boundary. Attention isolation also comes from the position ids: transformers 5.x turns restarts into a
block-diagonal causal mask (sdpa, eager, flex, flash varlen) only when the model gets no 2D attention mask and
no KV cache, which is how `train.chunked.causal_lm_loss` calls it. A 4D mask would cost batch x seq^2 memory.
"""

from __future__ import annotations

import bisect

import torch
from torch import Tensor

from lmforge.data.chat import IGNORE_INDEX, Example


def pack(examples: list[Example], max_length: int) -> list[dict]:
    """Best-fit decreasing packing of examples into rows of input_ids, labels and position_ids.

    Args:
        examples: tokenised examples, each at most `max_length` tokens (truncate first); empty ones are dropped.
        max_length: tokens per row at most.

    Returns:
        Rows {"input_ids", "labels", "position_ids"} (lists of ints, equal lengths). Order is deterministic:
        rows are opened longest example first, and examples sit in a row in the order they were placed.
    """
    for index, example in enumerate(examples):
        if len(example.labels) != len(example.input_ids):
            raise ValueError(f"example {index} has {len(example.input_ids)} ids but {len(example.labels)} labels")
        if len(example.input_ids) > max_length:
            raise ValueError(
                f"example {index} has {len(example.input_ids)} tokens, more than max_length={max_length}: "
                "truncate it first"
            )
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))  # stable: ties keep input order
    rows: list[list[int]] = []  # example indices per row
    room: list[tuple[int, int]] = []  # (tokens left, row index), ascending: the first that fits is the best fit
    for index in order:
        size = len(examples[index].input_ids)
        if size == 0:
            continue
        slot = bisect.bisect_left(room, (size, -1))
        if slot == len(room):
            rows.append([index])
            left, row = max_length - size, len(rows) - 1
        else:
            left, row = room.pop(slot)
            rows[row].append(index)
            left -= size
        if left:
            bisect.insort(room, (left, row))
    return [_row([examples[i] for i in members]) for members in rows]


def _row(examples: list[Example]) -> dict:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for example in examples:
        ids += example.input_ids
        # The first token would be predicted from the previous example's last token: no loss there.
        labels += [IGNORE_INDEX] + example.labels[1:]
        positions += range(len(example.input_ids))
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def collate(rows: list[dict], pad_id: int) -> dict[str, Tensor]:
    """Right-pad packed rows into (batch, width) int64 tensors: input_ids, labels, position_ids, attention_mask.

    Pads get pad_id, IGNORE_INDEX, position 0 and mask 0. Give the model input_ids and position_ids but not the
    attention_mask (causal_lm_loss does this): a 2D mask turns off transformers' packed-sequence detection, and
    the examples would attend to each other. The mask is there to count or select real tokens.
    """
    if not rows:
        raise ValueError("collate needs at least one row")
    width = max(len(row["input_ids"]) for row in rows)

    def padded(key: str, value: int) -> Tensor:
        return torch.tensor([row[key] + [value] * (width - len(row[key])) for row in rows], dtype=torch.long)

    return {
        "input_ids": padded("input_ids", pad_id),
        "labels": padded("labels", IGNORE_INDEX),
        "position_ids": padded("position_ids", 0),
        "attention_mask": torch.tensor(
            [[1] * len(row["input_ids"]) + [0] * (width - len(row["input_ids"])) for row in rows], dtype=torch.long
        ),
    }
