"""The dry-run estimates follow what a step will do: a narrower student trains faster, a filter that needs the
model scores every record, a mixture of experts pays for its routing check (lmforge/recipe/estimate.py)."""

from __future__ import annotations

import json

from lmforge.recipe import estimate

TEACHER = estimate.ModelFacts(params=134_515_008, layers=30, hidden=576, vocab=49152, intermediate=1536)


def facts_of(ref: str) -> estimate.ModelFacts:
    return TEACHER


def test_width_pruned_students_are_estimated_at_their_size():
    plain = {"teacher": "t", "data": {"task": "dates"}, "train": {"max_steps": 10}, "general": {"ratio": 0}}
    full_depth = estimate.distill({**plain, "width": {"params_fraction": 0.6}}, facts_of)
    narrow = estimate.distill({**plain, "width": {"params_fraction": 0.3}}, facts_of)
    assert full_depth.output.params == int(TEACHER.params * 0.6) and full_depth.output.layers == 30
    assert narrow.seconds < full_depth.seconds
    mlp = estimate.distill({**plain, "student_layers": 19, "width": {"intermediate_size": 1024}}, facts_of)
    depth_only = estimate.distill({**plain, "student_layers": 19}, facts_of)
    cut = 19 * 3 * 576 * (1536 - 1024)  # the MLP weights the narrower width removes
    assert depth_only.output.params - mlp.output.params == cut
    assert mlp.output.intermediate == 1024 and mlp.seconds < depth_only.seconds


def test_filter_scores_records_only_when_a_rule_needs_the_model(tmp_path):
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps({"prompt": "p" * 80, "completion": "c" * 40}) + "\n" for _ in range(400)))
    scored = estimate.filter_step({"data": str(data), "output": "o"}, facts_of)  # IFD <= 1 by default
    checks_only = estimate.filter_step({"data": str(data), "output": "o", "ifd_max": None}, facts_of)
    assert "400 records scored twice" in scored.basis and "no model" in checks_only.basis
    assert scored.seconds > 10 * checks_only.seconds
    half = estimate.filter_step({"data": str(data), "output": "o", "limit": 200}, facts_of)
    assert half.seconds - estimate.START_S < 0.51 * (scored.seconds - estimate.START_S)


def test_moe_counts_its_experts_and_routing_check():
    experts = [{"source_model": "a", "positive_prompts": ["x"]}, {"source_model": "b", "positive_prompts": ["y"]}]
    config = {"base_model": "base", "experts": experts, "experts_per_token": 1}
    built = estimate.moe(config, facts_of)
    assert built.output.params == TEACHER.params + 3 * 576 * 1536 * 30  # one more MLP per layer
    config["routing_tasks"] = ["dates", "extraction"]
    routed = estimate.moe(config, facts_of)
    assert routed.seconds > built.seconds and "60 routing records" in routed.basis
    trained = estimate.moe({**config, "train_router": {"steps": 20}}, facts_of)
    assert trained.seconds > routed.seconds and "routers trained 20 steps x 8 rows" in trained.basis
