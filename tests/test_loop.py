"""The training loop on a tiny model: learns, accumulation invariance, exact resume after a kill."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lmforge.data.chat import IGNORE_INDEX, render_example
from lmforge.models.load import load_model
from lmforge.train.loop import (
    TrainConfig,
    epoch_order,
    learning_rate_factor,
    restore_best,
    split_by_tokens,
    train,
)


def plain_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
    return loss, {"tokens": int((labels != IGNORE_INDEX).sum())}


def collate(rows):
    width = max(len(r["input_ids"]) for r in rows)
    pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
    return {
        "input_ids": torch.tensor([pad(r["input_ids"], 0) for r in rows]),
        "labels": torch.tensor([pad(r["labels"], IGNORE_INDEX) for r in rows]),
        "attention_mask": torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in rows]),
    }


@pytest.fixture(scope="module")
def rows(tiny_llama):
    tokenizer = load_model(tiny_llama).tokenizer
    records = [{"prompt": f"Add {a} and {b}.", "completion": str(a + b)} for a in range(4) for b in range(6)]
    return [vars(render_example(tokenizer, r)) for r in records]


def fresh(tiny_llama):
    torch.manual_seed(0)
    return load_model(tiny_llama, device="cpu").model


def weights(model):
    return {k: v.detach().cpu().clone() for k, v in model.named_parameters()}


def test_loss_decreases_and_params_change(tiny_llama, rows, tmp_path):
    model = fresh(tiny_llama)
    before = weights(model)
    cfg = TrainConfig(lr=1e-2, max_steps=25, batch_size=8, schedule="constant", save_every=100)
    history = train(model, rows, plain_loss, collate, cfg, tmp_path)
    losses = [h["loss"] for h in history if "loss" in h]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    assert any(not torch.equal(before[k], v) for k, v in weights(model).items())
    assert (tmp_path / "checkpoint" / "trainable.safetensors").is_file()
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 25


def test_batch1_accum8_equals_batch8_accum1(tiny_llama, rows, tmp_path):
    results = []
    for batch_size, accum in ((8, 1), (1, 8)):
        model = fresh(tiny_llama)
        cfg = TrainConfig(lr=1e-2, max_steps=3, batch_size=batch_size, grad_accum=accum, save_every=100)
        history = train(model, rows, plain_loss, collate, cfg, tmp_path / f"{batch_size}x{accum}")
        results.append((weights(model), [h["loss"] for h in history]))
    (w_a, loss_a), (w_b, loss_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for name in w_a:
        torch.testing.assert_close(w_a[name], w_b[name], atol=1e-5, rtol=1e-4)


def test_split_by_tokens_makes_the_fewest_equal_parts_that_fit():
    batch = [{"input_ids": [1] * n} for n in (10, 30, 20, 5, 7, 8)]  # padded: 6 x 30 = 180 tokens
    assert split_by_tokens(batch, 0) == [batch]
    assert split_by_tokens(batch, 180) == [batch]
    assert [len(p) for p in split_by_tokens(batch, 100)] == [3, 3]
    assert [len(p) for p in split_by_tokens(batch, 50)] == [1, 1, 1, 1, 1, 1]  # 4 parts of 2 would not fit
    assert [len(p) for p in split_by_tokens(batch, 1)] == [1] * 6  # never less than one row
    pairs = [{"chosen_input_ids": [1] * 10, "rejected_input_ids": [1] * 20}] * 4  # a pair is 30 tokens
    assert [len(p) for p in split_by_tokens(pairs, 60)] == [2, 2]


def test_token_budget_split_gives_the_same_update(tiny_llama, rows, tmp_path):
    """Splitting each batch to fit micro_batch_tokens runs smaller forwards but gives the unsplit update."""
    results = []
    for budget in (0, 40):
        sizes = []

        def counting_collate(batch, sizes=sizes):
            sizes.append(len(batch))
            return collate(batch)

        model = fresh(tiny_llama)
        cfg = TrainConfig(lr=1e-2, max_steps=3, batch_size=8, micro_batch_tokens=budget, save_every=100)
        history = train(model, rows, plain_loss, counting_collate, cfg, tmp_path / f"budget{budget}")
        results.append((weights(model), [h["loss"] for h in history], sizes))
    (w_a, loss_a, sizes_a), (w_b, loss_b, sizes_b) = results
    assert set(sizes_a) == {8} and max(sizes_b) < 8 and sum(sizes_b) == sum(sizes_a)
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for name in w_a:
        torch.testing.assert_close(w_a[name], w_b[name], atol=1e-5, rtol=1e-4)


def test_release_memory_is_opt_in(tiny_llama, rows, tmp_path, monkeypatch):
    from lmforge.train import loop

    calls = []
    monkeypatch.setattr(loop, "return_freed_memory_to_os", lambda: calls.append(1) or True)
    for flag in (False, True):
        cfg = TrainConfig(max_steps=1, batch_size=4, save_every=100, release_memory=flag)
        train(fresh(tiny_llama), rows, plain_loss, collate, cfg, tmp_path / str(flag))
    assert calls == [1]  # only the run that asked for it


@pytest.mark.parametrize("step_in_backward", [{}, {"max_grad_norm": None, "optimizer_in_backward": True}])
def test_resume_after_kill_gives_the_same_losses(step_in_backward, tiny_llama, rows, tmp_path):
    cfg = TrainConfig(lr=5e-3, max_steps=6, batch_size=4, warmup_steps=2, save_every=100, **step_in_backward)
    straight = train(fresh(tiny_llama), rows, plain_loss, collate, cfg, tmp_path / "straight")

    def kill_at_3(entry):
        if entry.get("step") == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(fresh(tiny_llama), rows, plain_loss, collate, cfg, tmp_path / "killed", on_log=kill_at_3)
    state = json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3
    resumed_model = fresh(tiny_llama)
    resumed = train(resumed_model, rows, plain_loss, collate, cfg, tmp_path / "killed", resume=True)
    assert [h["step"] for h in resumed] == [4, 5, 6]
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in straight[3:]], rel=1e-5)


def test_early_stopping_and_best_checkpoint(tiny_llama, rows, tmp_path):
    scores = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])
    cfg = TrainConfig(lr=1e-3, max_steps=20, batch_size=4, eval_every=1, patience=2, save_every=100)
    model = fresh(tiny_llama)
    history = train(model, rows, plain_loss, collate, cfg, tmp_path, evaluate=lambda m: {"loss": next(scores)})
    evals = [h for h in history if "eval" in h]
    assert len(evals) == 4  # 3.0, 2.0 (best), then two without gain
    assert evals[-1]["best_step"] == 2
    best = load_file(tmp_path / "best" / "trainable.safetensors")
    assert any(not torch.equal(best[k], v) for k, v in weights(model).items())  # training went on past step 2
    assert restore_best(model, tmp_path)
    assert all(torch.equal(best[k], v) for k, v in weights(model).items())
    assert not restore_best(model, tmp_path / "elsewhere")


def test_no_trainable_tokens_is_an_error(tiny_llama, rows, tmp_path):
    masked = [dict(r, labels=[IGNORE_INDEX] * len(r["labels"])) for r in rows]
    with pytest.raises(ValueError, match="no trainable tokens"):
        train(fresh(tiny_llama), masked, plain_loss, collate, TrainConfig(max_steps=1, batch_size=2), tmp_path)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays(schedule):
    cfg = TrainConfig(max_steps=10, warmup_steps=2, schedule=schedule)
    factors = [learning_rate_factor(step, cfg) for step in range(10)]
    assert factors[0] == 0.5 and factors[1] == 1.0
    assert factors[2] == 1.0
    if schedule != "constant":
        assert factors[-1] < factors[3] and all(a >= b for a, b in zip(factors[2:], factors[3:], strict=False))


def test_log_counts_trained_and_input_tokens(tiny_llama, rows, tmp_path):
    cfg = TrainConfig(max_steps=1, batch_size=4, save_every=100)
    (entry,) = train(fresh(tiny_llama), rows, plain_loss, collate, cfg, tmp_path)
    step_rows = [rows[i] for i in epoch_order(len(rows), seed=0, epoch=0)[:4]]
    assert entry["input_tokens"] == sum(len(r["input_ids"]) for r in step_rows)
    assert entry["tokens"] == sum(sum(label != IGNORE_INDEX for label in r["labels"][1:]) for r in step_rows)


def test_tensorboard_scalars_are_written(tiny_llama, rows, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TrainConfig(max_steps=2, batch_size=4, save_every=100, tensorboard=True)
    train(fresh(tiny_llama), rows, plain_loss, collate, cfg, tmp_path, evaluate=lambda m: {"val_loss": 1.0})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert events.Scalars("eval/val_loss")[0].value == 1.0


def checkpointing(model: torch.nn.Module) -> bool:
    """Whether a layer recomputes activations: transformers' `is_gradient_checkpointing` (a FutureWarning since
    its rename) and `is_activation_checkpointing` (absent from 5.0) both read these flags."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_gradient_checkpointing_gives_the_same_update(tiny_llama, rows, tmp_path):
    """Recomputing activations in backward changes memory, not the update; the model is left as it was."""
    results = []
    for flag in (False, True):
        model, seen = fresh(tiny_llama), set()

        def loss_fn(model, batch, seen=seen):
            seen.add(checkpointing(model))
            return plain_loss(model, batch)

        cfg = TrainConfig(lr=1e-2, max_steps=3, batch_size=8, save_every=100, gradient_checkpointing=flag)
        history = train(model, rows, loss_fn, collate, cfg, tmp_path / str(flag))
        assert seen == {flag} and not checkpointing(model)
        results.append((weights(model), [h["loss"] for h in history]))
    (w_a, loss_a), (w_b, loss_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for name in w_a:
        torch.testing.assert_close(w_a[name], w_b[name], atol=1e-5, rtol=1e-4)


def test_resume_with_other_trained_parameters_is_a_clear_error(tiny_llama, rows, tmp_path):
    from lmforge.errors import UserError

    cfg = TrainConfig(lr=1e-2, max_steps=1, batch_size=8, save_every=1)
    train(fresh(tiny_llama), rows, plain_loss, collate, cfg, tmp_path)
    model = fresh(tiny_llama)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("layers.0." in name)  # fewer trained tensors than the checkpoint holds
    longer = TrainConfig(lr=1e-2, max_steps=2, batch_size=8, save_every=1)
    with pytest.raises(UserError, match="does not fit this run's trained parameters"):
        train(model, rows, plain_loss, collate, longer, tmp_path, resume=True)


def test_a_refused_training_setting_leaves_the_model_as_it_was(tiny_llama_tied, rows, tmp_path):
    from lmforge.errors import UserError

    model = fresh(tiny_llama_tied)
    model.supports_gradient_checkpointing = False
    cfg = TrainConfig(max_steps=1, batch_size=8, save_every=100, gradient_checkpointing=True)
    with pytest.raises(UserError, match="does not support train.gradient_checkpointing"):
        train(model, rows, plain_loss, collate, cfg, tmp_path)
    assert not model.get_input_embeddings().sparse  # the tied-embedding setting entered first was undone


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_llama_tied"])
def test_optimizer_in_backward_gives_the_same_update(fixture, rows, tmp_path, request):
    """Stepping each parameter inside backward is AdamW's update, without clipping, for tied heads too."""
    from lmforge.train.chunked import causal_lm_loss

    path = request.getfixturevalue(fixture)
    results = []
    for flag in (False, True):
        model = fresh(path)
        clip = None if flag else 1e9  # a bound never reached: the reference logs its norm and does not clip
        cfg = TrainConfig(
            lr=1e-2, max_steps=3, batch_size=8, save_every=100, max_grad_norm=clip, optimizer_in_backward=flag
        )
        history = train(model, rows, causal_lm_loss, collate, cfg, tmp_path / str(flag))
        assert all(p.grad is None for p in model.parameters())  # nothing left holding a gradient
        results.append((weights(model), history))
    (w_a, log_a), (w_b, log_b) = results
    assert [h["loss"] for h in log_a] == pytest.approx([h["loss"] for h in log_b], rel=1e-5)
    assert [h["grad_norm"] for h in log_b] == pytest.approx([h["grad_norm"] for h in log_a], rel=1e-4)
    assert any(not torch.equal(w_a[k], fresh(path).state_dict()[k]) for k in w_a)  # it trained at all
    for name in w_a:
        torch.testing.assert_close(w_a[name], w_b[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ({}, "max_grad_norm"),
        ({"max_grad_norm": None, "grad_accum": 2}, "grad_accum"),
        ({"max_grad_norm": None, "micro_batch_tokens": 64}, "micro_batch_tokens"),
    ],
)
def test_optimizer_in_backward_refuses_what_it_cannot_honour(setting, key):
    from lmforge.errors import UserError

    with pytest.raises(UserError, match=f"train.{key}="):  # refused when the config is built
        TrainConfig(max_steps=1, batch_size=4, optimizer_in_backward=True, **setting)


def test_an_interrupt_inside_a_backward_step_keeps_the_last_whole_checkpoint(tiny_llama, rows, tmp_path):
    """Ctrl-C while parameters are stepping in backward: saving then would mix two steps, so resume starts
    from the last checkpoint and still gives the uninterrupted run's losses."""
    cfg = TrainConfig(lr=5e-3, max_steps=4, batch_size=4, save_every=1, max_grad_norm=None, optimizer_in_backward=True)
    straight = train(fresh(tiny_llama), rows, plain_loss, collate, cfg, tmp_path / "straight")
    model = fresh(tiny_llama)
    last = list(model.parameters())[0]  # the embedding: its gradient is complete last, after the others stepped
    calls = []

    def interrupt_at_step_3(param):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    handle = last.register_post_accumulate_grad_hook(interrupt_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(model, rows, plain_loss, collate, cfg, tmp_path / "killed")
    handle.remove()
    state = json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2  # not the half-stepped third
    resumed = train(fresh(tiny_llama), rows, plain_loss, collate, cfg, tmp_path / "killed", resume=True)
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in straight[2:]], rel=1e-5)
