"""Packing: best-fit rows, restarting positions, masked boundaries, and real attention isolation on a tiny llama."""

from __future__ import annotations

import pytest
import torch

from lmforge.data.chat import IGNORE_INDEX, Example
from lmforge.data.packing import collate, pack
from lmforge.models.load import load_model
from lmforge.train.chunked import causal_lm_loss, chunked_cross_entropy


def _marked(lengths: list[int]) -> list[Example]:
    """Example i is `lengths[i]` copies of token 10 + i, trained everywhere but its first token."""
    return [Example([10 + i] * n, [IGNORE_INDEX] + [10 + i] * (n - 1)) for i, n in enumerate(lengths)]


def test_best_fit_decreasing_puts_each_example_in_the_row_with_least_room_that_fits():
    rows = pack(_marked([2, 6, 4, 5, 3]), max_length=8)
    # 6 opens a row, 5 opens one, 4 opens one; 3 fits exactly beside 5 and 2 exactly beside 6.
    assert [row["input_ids"] for row in rows] == [[11] * 6 + [10] * 2, [13] * 5 + [14] * 3, [12] * 4]


def test_rows_restart_positions_and_take_no_loss_across_a_boundary():
    examples = [Example([1, 2, 3], [1, 2, 3]), Example([4, 5], [IGNORE_INDEX, 5]), Example([6], [6])]
    (row,) = pack(examples, max_length=8)
    assert row == {
        "input_ids": [1, 2, 3, 4, 5, 6],
        "labels": [IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5, IGNORE_INDEX],
        "position_ids": [0, 1, 2, 0, 1, 0],
    }


def test_every_example_lands_in_exactly_one_row_within_max_length():
    lengths = [int(n) for n in torch.randint(1, 30, (200,), generator=torch.Generator().manual_seed(0))]
    rows = pack(_marked(lengths) + [Example([], [])], max_length=32)
    assert all(len(row["input_ids"]) <= 32 for row in rows)
    assert sorted(token for row in rows for token in row["input_ids"]) == sorted(
        10 + i for i, n in enumerate(lengths) for _ in range(n)
    )
    assert len(rows) <= sum(lengths) // 32 + 10  # close to the lower bound, not one row per example


def test_rejects_examples_longer_than_a_row_or_with_mismatched_labels():
    with pytest.raises(ValueError, match="truncate"):
        pack(_marked([3, 9]), max_length=8)
    with pytest.raises(ValueError, match="labels"):
        pack([Example([1, 2], [1])], max_length=8)


def test_collate_right_pads_every_field():
    batch = collate(
        [
            {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 0]},
            {"input_ids": [8], "labels": [-100], "position_ids": [0]},
        ],
        pad_id=2,
    )
    assert {key: value.tolist() for key, value in batch.items()} == {
        "input_ids": [[5, 6, 7], [8, 2, 2]],
        "labels": [[-100, 6, 7], [-100, -100, -100]],
        "position_ids": [[0, 1, 0], [0, 0, 0]],
        "attention_mask": [[1, 1, 1], [1, 0, 0]],
    }
    assert all(value.dtype == torch.long for value in batch.values())


@pytest.fixture(scope="module")
def model_and_examples(tiny_llama):
    model = load_model(tiny_llama, device="cpu").model
    generator = torch.Generator().manual_seed(3)
    examples = []
    for n in [9, 7, 6, 5, 4, 3]:
        ids = torch.randint(3, model.config.vocab_size, (n,), generator=generator).tolist()
        examples.append(Example(ids, [IGNORE_INDEX] * 2 + ids[2:]))  # a 2-token prompt
    return model, examples


def _alone_loss(model, example: Example) -> torch.Tensor:
    ids = torch.tensor([example.input_ids])
    hidden = model.get_decoder()(input_ids=ids).last_hidden_state
    return chunked_cross_entropy(hidden, model.lm_head.weight, torch.tensor([example.labels]))[0]


def test_a_packed_row_with_position_ids_and_no_mask_scores_each_example_as_if_alone(model_and_examples):
    model, examples = model_and_examples
    (row,) = pack(examples[:3], max_length=22)  # 9 + 7 + 6 tokens, no padding
    ids, positions = torch.tensor([row["input_ids"]]), torch.tensor([row["position_ids"]])
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
        start = 0
        for example in examples[:3]:
            end = start + len(example.input_ids)
            packed = chunked_cross_entropy(
                hidden[:, start:end], model.lm_head.weight, torch.tensor([row["labels"]])[:, start:end]
            )[0]
            assert packed.item() == pytest.approx(_alone_loss(model, example).item(), rel=1e-5)
            start = end


def test_transformers_mixes_packed_examples_given_a_2d_mask_or_a_kv_cache(model_and_examples):
    """Why causal_lm_loss passes no mask and use_cache=False: either one turns packing detection off (5.24)."""
    model, examples = model_and_examples
    (row,) = pack(examples[:2], max_length=16)
    batch = collate([row], pad_id=0)
    second = slice(len(examples[0].input_ids), None)
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([examples[1].input_ids])).logits[0]
        isolated = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        with_mask = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
        with_cache = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])  # config use_cache=True
    assert torch.allclose(isolated.logits[0, second], alone, atol=1e-4)
    assert not torch.allclose(with_mask.logits[0, second], alone, atol=1e-2)
    assert not torch.allclose(with_cache.logits[0, second], alone, atol=1e-2)


def test_causal_lm_loss_on_a_padded_packed_batch_equals_the_examples_alone(model_and_examples):
    model, examples = model_and_examples
    rows = pack(examples, max_length=16)
    assert [len(row["input_ids"]) for row in rows] == [16, 15, 3]  # [9, 7], [6, 5, 4], [3]: two rows are padded
    loss, metrics = causal_lm_loss(model, collate(rows, pad_id=0), chunk_size=4)
    model.zero_grad()
    loss.backward()
    packed_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    alone = sum(_alone_loss(model, example) for example in examples)
    alone.backward()
    assert metrics["tokens"] == sum(len(e.input_ids) - 2 for e in examples)
    assert loss.item() == pytest.approx(alone.item(), rel=1e-5)
    for name, param in model.named_parameters():
        scale = param.grad.abs().max()
        assert (packed_grads[name] - param.grad).abs().max() <= 1e-5 * scale, name
