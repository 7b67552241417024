"""`train_router:` in the `lmforge moe` YAML: router-only training through the one loop (merge/moe_training.py).

The experts are different fine-tunes of one tiny llama (merge_helpers.family, as in test_moe.py). Each build
is compared with the same build untrained: only the router tensors may differ, every other tensor bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from merge_helpers import family, leftovers, weights

from lmforge.errors import UserError
from lmforge.merge import moe_training
from lmforge.merge.moe import moe
from lmforge.merge.moe_training import ROUTER_SUFFIX, balance_loss

TASKS = ["dates", "extraction"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    """[base, ft1, ft2]: a tiny llama and two different fine-tune-like variants."""
    return family(tmp_path_factory.mktemp("moe_router_family"), 3)


def moe_config(models: list[Path], **extra) -> dict:
    base, ft1, ft2 = models
    return {
        "base_model": str(base),
        "gate_mode": "hidden",
        "dtype": "float32",
        "experts_per_token": 1,
        "experts": [
            {"source_model": str(ft1), "positive_prompts": ["the cat sat on the mat", "a dog ran home"]},
            {"source_model": str(ft2), "positive_prompts": ["1 2 3 4 5", "7 8 9 10"]},
        ],
        **extra,
    }


def split_changes(untrained: Path, trained: Path) -> tuple[list[str], list[str]]:
    """(names of tensors that differ, names equal bit for bit) between two output folders of the same layout."""
    before, after = weights(untrained), weights(trained)
    assert sorted(before) == sorted(after)
    changed = sorted(name for name in before if not torch.equal(before[name], after[name]))
    return changed, sorted(set(before) - set(changed))


def test_training_moves_only_the_routers_and_raises_routing_accuracy(models, tmp_path):
    """On the tasks' train splits, 20 steps: every token of a task's test records is counted (chat template
    included, which both tasks share), and the mean share sent to the right expert must rise by 10 points."""
    config = moe_config(models, routing_tasks=TASKS, routing_limit=4)
    untrained = moe(config, tmp_path / "untrained")
    settings = {"steps": 20, "lr": 1e-2, "records_per_expert": 16, "max_length": 64}
    trained = moe(config | {"train_router": settings}, tmp_path / "trained")

    changed, same = split_changes(untrained, trained)
    assert changed == [f"model.layers.{i}.mlp.gate.weight" for i in range(2)]
    assert len(same) > 10  # embeddings, attention, norms, experts, head

    record = json.loads((trained / "run.json").read_text())
    training = record["router"]["training"]
    assert training["steps"] == 20 and training["data"] == "tasks" and training["texts"] == 32
    assert training["terms_scored_on"] == 32  # fewer texts than SCORED_ROWS: all of them
    assert training["trained"] == changed
    before = training["routing_accuracy_before"]
    after = record["metrics"]["moe"]["routing_accuracy"]
    assert before == json.loads((untrained / "run.json").read_text())["metrics"]["moe"]["routing_accuracy"]
    assert after["mean"] > before["mean"] + 0.10, (before, after)
    assert training["terms_after"]["label"] < 0.8 * training["terms_before"]["label"]
    log = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == list(range(1, 21))
    assert yaml.safe_load((trained / "lmforge.yaml").read_text())["train_router"] == settings
    assert "trained for 20 steps (routers only)" in (trained / "README.md").read_text()
    assert leftovers(tmp_path) == []


def test_language_model_loss_alone_moves_qwen_routers_and_nothing_else(models, tmp_path):
    """Top-2 of 2 experts: the next-token loss reaches the routers through the mixing weights. Qwen2-MoE's
    shared-expert gate is not a router between experts, so it stays as built."""
    shared = [{"source_model": str(models[0]), "positive_prompts": ["hello there"]}]
    config = moe_config(models, experts_per_token=2, shared_experts=shared, gate_mode="cheap_embed")
    untrained = moe(config, tmp_path / "untrained")
    settings = {"steps": 4, "lr": 1e-2, "label_weight": 0, "balance_weight": 0, "data": "prompts"}
    trained = moe(config | {"train_router": settings}, tmp_path / "trained")
    changed, same = split_changes(untrained, trained)
    assert changed == [f"model.layers.{i}{ROUTER_SUFFIX}" for i in range(2)]
    assert "model.layers.0.mlp.shared_expert_gate.weight" in same
    training = json.loads((trained / "run.json").read_text())["router"]["training"]
    assert training["terms_after"]["lm"] < training["terms_before"]["lm"]


@pytest.mark.parametrize("top_k", [1, 2])
def test_balance_loss_equals_naive_switch_loss_and_transformers(top_k):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = torch.randn(50, 4, generator=torch.Generator().manual_seed(top_k))
    probs = logits.softmax(dim=-1).tolist()
    naive = 0.0
    for expert in range(4):  # E x sum_i f_i P_i, one token at a time
        chosen = sum(expert in sorted(range(4), key=lambda e, p=p: -p[e])[:top_k] for p in probs) / len(probs)
        mean_prob = sum(p[expert] for p in probs) / len(probs)
        naive += 4 * chosen * mean_prob
    ours = balance_loss(logits, top_k)
    assert ours.item() == pytest.approx(naive, rel=1e-5)
    assert ours.item() == pytest.approx(float(load_balancing_loss_func((logits,), 4, top_k)), rel=1e-5)
    even = balance_loss(torch.zeros(8, 4), 1)  # a uniform router: P_i = 1/E, so E x sum_i f_i P_i = 1
    assert even.item() == pytest.approx(1.0)


# ---------------------------------------------------------------- bad inputs: one line, nothing written


@pytest.mark.parametrize(
    "train_router, extra, message",
    [
        ({"steps": 0}, {}, "train_router.steps must be >= 1, got 0"),
        ({"stpes": 5}, {}, "unknown key 'train_router.stpes': did you mean 'train_router.steps'?"),
        ({"data": "tasks"}, {}, "train_router.data: tasks needs routing_tasks"),
        ({"lr": -1}, {}, "train_router.lr must be > 0"),
        ({"label_weight": 0, "balance_weight": 0}, {}, "with experts_per_token 1 the language-model loss"),
        ({}, {"routing_tasks": ["dates", "my.jsonl"]}, "'my.jsonl' is not one"),
    ],
    ids=["steps_zero", "unknown_key", "tasks_without_routing_tasks", "negative_lr", "no_gradient", "file_task"],
)
def test_bad_router_training_one_line_nothing_written(models, tmp_path, train_router, extra, message):
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(moe_config(models, train_router=train_router, **extra)))
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("?", r"\?")) as err:
        moe(path, tmp_path / "out")
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_recipe_check_refuses_bad_router_training(models):
    from lmforge.recipe.kinds import KINDS

    with pytest.raises(UserError, match="train_router.steps must be >= 1, got -3"):
        KINDS["moe"].check(moe_config(models, train_router={"steps": -3}), "step moe")


def test_the_scored_sample_spans_every_expert():
    rows = [{"input_ids": [i], "expert": i // 200} for i in range(400)]  # as training_texts: grouped by expert
    sample = moe_training.scored_sample(rows)
    assert len(sample) == moe_training.SCORED_ROWS
    assert sum(r["expert"] == 0 for r in sample) == sum(r["expert"] == 1 for r in sample) == 32
