"""Signals: on-policy normalisation (per-token JSD stays under ln 2), cached top-k, sequence-level KD, step-by-step."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from lmforge.data.prepare import DataSettings, tokenize
from lmforge.distill import rationale as step_by_step
from lmforge.distill import signals
from lmforge.distill.objectives import Objective
from lmforge.distill.run import Guards, make_loss_fn
from lmforge.distill.signals import SignalSettings, batch_collate
from lmforge.distill.student import shared_vocab
from lmforge.errors import UserError
from lmforge.models.load import load_model
from lmforge.models.tiny import make_tiny_llama
from lmforge.train.loop import TrainConfig, train


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A sharp teacher (its head scaled up) and a different random student: far apart, as the bug needs."""
    teacher = load_model(make_tiny_llama(tmp_path_factory.mktemp("t"), layers=2, seed=11))
    with torch.no_grad():
        teacher.model.lm_head.weight.mul_(4.0)
    student = load_model(make_tiny_llama(tmp_path_factory.mktemp("s"), layers=1, seed=12))
    return teacher, student


def short_rows(tokenizer, n=8):
    records = [{"prompt": f"Say {word}.", "completion": "a"} for word in ("one", "two", "three", "four")[: n // 2]] * 2
    return tokenize(records, tokenizer, DataSettings(max_length=64))


def test_on_policy_loss_is_divided_by_the_regenerated_tokens(pair, tmp_path):
    teacher, student = pair
    tokenizer = student.tokenizer
    rows = short_rows(tokenizer)
    dataset_tokens = sum(sum(label != -100 for label in row["labels"][1:]) for row in rows[:4])
    guards = Guards()
    loss_fn = make_loss_fn(
        teacher.model, None, [Objective("jsd", beta=0.5)], shared_vocab(teacher.model, student.model), 64, guards
    )
    settings = SignalSettings(kind="on_policy", on_policy_fraction=1.0, max_new_tokens=12)
    collate = signals.on_policy(
        batch_collate(tokenizer.pad_token_id), student.model, settings, tokenizer.pad_token_id,
        tokenizer.eos_token_id, guards.warn,
    )  # fmt: skip
    cfg = TrainConfig(lr=1e-3, max_steps=3, batch_size=4, save_every=100, max_grad_norm=None)
    history = [h for h in train(student.model, rows, loss_fn, collate, cfg, tmp_path / "w") if "loss" in h]
    for entry in history:
        assert entry["tokens"] > dataset_tokens  # the student wrote longer completions than the data's
        assert 0 < entry["loss"] <= math.log(2)  # per-token JSD is bounded by ln 2 ...
    # ... while dividing the same sum by the dataset's token count (the bug class) breaks the bound.
    assert max(entry["loss"] * entry["tokens"] / dataset_tokens for entry in history) > math.log(2)
    assert guards.counts["truncated"] >= 1


def test_cached_top_k_with_the_whole_vocabulary_equals_the_online_teacher(pair, tmp_path):
    teacher, student = pair
    rows = short_rows(student.tokenizer, 4)
    for index, row in enumerate(rows):
        row["row"] = index
    vocab = shared_vocab(teacher.model, student.model)
    collate = batch_collate(student.tokenizer.pad_token_id)
    path = tmp_path / "topk.safetensors"
    objectives = [Objective("reverse_kl", temperature=2.0), Objective("tv")]
    signals.write_topk_cache(teacher.model, rows, collate, vocab, vocab, [1.0, 2.0], path, "k")
    batch = collate(rows[1:3])
    cache = signals.TopKCache(path)
    cached, _ = make_loss_fn(None, cache, objectives, vocab, 64, Guards())(student.model, batch)
    online, _ = make_loss_fn(teacher.model, None, objectives, vocab, 64, Guards())(student.model, batch)
    assert abs(cached.item() - online.item()) <= 1e-5 * online.item()
    signals.write_topk_cache(teacher.model, rows, collate, vocab, 4, [2.0], path, "k4")
    small = signals.TopKCache(path)
    assert small.indices.shape[1] == 4 and set(small.logprobs) == {2.0}
    with pytest.raises(UserError, match="temperatures"):
        make_loss_fn(None, small, objectives, vocab, 64, Guards())(student.model, batch)


def test_sequence_targets_are_filtered_and_written_once(pair, tmp_path, monkeypatch):
    teacher, _ = pair
    tokenizer = teacher.tokenizer
    eos = tokenizer.eos_token_id
    words = tokenizer("fine answer", add_special_tokens=False)["input_ids"]
    outputs = [
        (words + [eos], True),  # kept
        (words, False),  # truncated: no EOS
        ([eos], True),  # too short
        ([5, 6, 7, 8] * 6 + [eos], True),  # repetitive
    ]
    calls = []

    def fake_generate(model, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return outputs

    monkeypatch.setattr(signals, "generate", fake_generate)
    records = [{"prompt": f"p{i}", "completion": "gold"} for i in range(4)]
    path = tmp_path / "targets.jsonl"
    settings = SignalSettings(kind="sequence")
    kept = signals.sequence_targets(teacher.model, tokenizer, records, ["x"] * 4, settings, path, "key")
    assert kept == [{"prompt": "p0", "completion": "fine answer"}]
    assert signals.sequence_targets(teacher.model, tokenizer, records, ["x"] * 4, settings, path, "key") == kept
    assert calls == [4]  # the second call read the cache
    signals.sequence_targets(teacher.model, tokenizer, records, ["x"] * 4, settings, path, "other key")
    assert calls == [4, 4]
    assert signals.repeat_share([1, 2, 3, 4, 5]) == 0 and signals.repeat_share([1, 2] * 10) > 0.5
    monkeypatch.setattr(signals, "generate", lambda *a, **k: [(words, False)] * 4)
    with pytest.raises(UserError, match="filtered out"):
        signals.sequence_targets(teacher.model, tokenizer, records, ["x"] * 4, settings, path, "third")


def test_student_samples_stop_at_eos_with_a_kv_cache(pair):
    _, student = pair
    tokenizer = student.tokenizer
    prompts = [tokenizer("Say one.", add_special_tokens=False)["input_ids"], [1, 2]]
    torch.manual_seed(0)
    out = signals.generate(student.model, prompts, 6, tokenizer.pad_token_id, tokenizer.eos_token_id, True, 1.0)
    assert len(out) == 2
    for tokens, finished in out:
        assert 1 <= len(tokens) <= 6 and finished == (tokens[-1] == tokenizer.eos_token_id)
        assert tokenizer.eos_token_id not in tokens[:-1]


def test_step_by_step_records_and_task_weights(pair, tmp_path, monkeypatch):
    teacher, _ = pair
    tokenizer = teacher.tokenizer
    texts = ["First look. Then add.\nAnswer: 12", "Guess.\nAnswer: 99", "no answer line"]
    monkeypatch.setattr(
        step_by_step,
        "generate",
        lambda *a, **k: [(tokenizer(t, add_special_tokens=False)["input_ids"], True) for t in texts],
    )
    records = [{"prompt": f"q{i}", "completion": "12"} for i in range(3)]
    settings = step_by_step.RationaleSettings(enabled=True, alpha=0.3)
    labels, rationales = step_by_step.rationale_records(
        teacher.model, tokenizer, records, settings, tmp_path / "r", "k"
    )
    assert labels == [{"prompt": "q0", "completion": "12"}]
    assert rationales == [{"prompt": "[rationale] q0", "completion": "First look. Then add."}]
    assert step_by_step.parse("a\nAnswer: b\n") == ("a", "b") and step_by_step.parse("x") == ("x", None)
    loose = step_by_step.RationaleSettings(enabled=True, require_correct=False)
    labels, _ = step_by_step.rationale_records(teacher.model, tokenizer, records, loose, tmp_path / "r", "k")
    assert len(labels) == 3  # the cache answered: same key
    label_rows = tokenize(labels, tokenizer, DataSettings())
    rationale_rows = tokenize(rationales, tokenizer, DataSettings())
    rows = step_by_step.weigh(label_rows, rationale_rows, 0.3)

    def weighted(selected):
        return sum(r["weight"] * sum(label != -100 for label in r["labels"][1:]) for r in selected)

    total = sum(sum(label != -100 for label in r["labels"][1:]) for r in rows)
    assert weighted(rows[: len(label_rows)]) / total == pytest.approx(0.3)
    assert weighted(rows[len(label_rows) :]) / total == pytest.approx(0.7)
    batch = batch_collate(tokenizer.pad_token_id)(rows)
    assert batch["weights"].shape == batch["labels"].shape


def test_guards_warn_once_and_count(caplog):
    guards = Guards()
    with caplog.at_level(logging.WARNING, logger="lmforge.distill"):
        guards.check({"tokens": 0})
        for _ in range(2):
            guards.check({"tokens": 4, "nonfinite": 1, "negative": 2, "student_entropy": 0.01, "teacher_entropy": 4.0})
        guards.check({"tokens": 4, "student_entropy": 3.0, "teacher_entropy": 4.0})
    assert dict(guards.counts) == {"empty_mask": 1, "nonfinite": 2, "negative": 2, "entropy_collapse": 2}
    assert caplog.text.count("NaN or infinite") == 1 and "entropy collapsed" in caplog.text
    assert "empty completion mask" in caplog.text


def test_accumulation_equals_one_big_batch(pair, tmp_path):
    """Batch 1 x accumulation 4 gives batch 4's update: the summed loss is divided by the step's tokens."""
    teacher, student = pair
    rows = tokenize(
        [{"prompt": f"Say {w}.", "completion": w * (i + 1)} for i, w in enumerate(["a", "bc", "def", "g"])],
        student.tokenizer,
        DataSettings(max_length=64),
    )
    vocab = shared_vocab(teacher.model, student.model)
    objectives = [Objective("forward_kl", temperature=2.0), Objective("ce", 0.5)]
    results = []
    for batch_size, accum in ((4, 1), (1, 4)):
        model = load_model(student.folder).model.train()
        loss_fn = make_loss_fn(teacher.model, None, objectives, vocab, 16, Guards())
        cfg = TrainConfig(lr=1e-2, max_steps=2, batch_size=batch_size, grad_accum=accum, save_every=100)
        history = train(model, rows, loss_fn, batch_collate(0), cfg, tmp_path / f"{batch_size}x{accum}")
        results.append(([h["loss"] for h in history], model.lm_head.weight.detach().clone()))
    (loss_a, w_a), (loss_b, w_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    torch.testing.assert_close(w_a, w_b, atol=1e-5, rtol=1e-4)
