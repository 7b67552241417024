"""Fusion at generation time (lmforge/eval/fusion.py) against naive versions written from the papers.

The naive versions recompute every member on the whole sequence at every step (no KV cache) and apply each rule
to raw logits, in the papers' form: mixture of probabilities, product of experts, DExperts
z_base + alpha (z_tuned - z_untuned), contrastive decoding log p_strong - log p_weak over the plausible head.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli

from lmforge.errors import UserError
from lmforge.eval import scoring
from lmforge.eval.fusion import FusedModel, Fusion, check_fusion, load_fused
from lmforge.eval.run import evaluate, run_eval
from lmforge.models.load import load_model
from lmforge.models.tiny import make_tiny_llama

PROMPTS = ["hello world", "a b", "the quick brown fox jumps over"]


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """Three tiny llamas with one tokenizer (different seeds: different next-token distributions)."""
    root = tmp_path_factory.mktemp("fusion")
    return [str(make_tiny_llama(root / f"m{seed}", seed=seed)) for seed in (0, 7, 9)]


@pytest.fixture(scope="module")
def members(trio):
    return [load_model(ref) for ref in trio]


def _naive_scores(method: str, logits: list[torch.Tensor], weights=None, alpha=None) -> torch.Tensor:
    """The rule on raw logits (vocab,), as the papers write it; returns a score whose argmax is the next token."""
    if method == "ensemble":
        probs = sum(w * torch.softmax(z.double(), -1) for w, z in zip(weights, logits, strict=True))
        return probs.log()
    if method == "product":
        return sum(w * torch.log_softmax(z.double(), -1) for w, z in zip(weights, logits, strict=True)).log_softmax(-1)
    if method == "dexperts":
        base, tuned, untuned = (z.double() for z in logits)
        return (base + alpha * (tuned - untuned)).log_softmax(-1)
    strong, weak = (torch.softmax(z.double(), -1) for z in logits)
    head = strong >= alpha * strong.max()
    return torch.where(head, strong.log() - weak.log(), -math.inf).log_softmax(-1)


def _naive_generate(models, method, ids: list[int], steps: int, weights=None, alpha=None):
    """Greedy decoding recomputing every member on the whole sequence each step; (tokens, per-step scores)."""
    ids, scores = list(ids), []
    for _ in range(steps):
        with torch.no_grad():
            logits = [m(input_ids=torch.tensor([ids])).logits[0, -1] for m in models]
        score = _naive_scores(method, logits, weights, alpha)
        scores.append(score)
        ids.append(int(score.argmax()))
    return ids, torch.stack(scores)


CASES = [
    ("ensemble", 3, [0.5, 0.3, 0.2], None),
    ("product", 2, [1.0, 0.5], None),
    ("dexperts", 3, None, 1.5),
    ("contrastive", 2, None, 0.1),
]


@pytest.mark.parametrize(("method", "count", "weights", "alpha"), CASES)
def test_fused_generation_equals_the_naive_step_by_step_rule(members, method, count, weights, alpha):
    fusion = check_fusion(method, count, weights, alpha)
    models = [m.model for m in members[:count]]
    fused = FusedModel(models, fusion, vocab=models[0].config.vocab_size)
    tokenizer = members[0].tokenizer
    differs = []  # whether the fused tokens differ from the first model's own greedy tokens
    for prompt in PROMPTS:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        want_ids, want_scores = _naive_generate(models, method, ids, 8, fusion.weights, fusion.alpha)
        differs.append(want_ids != _naive_generate(models[:1], "product", ids, 8, [1.0])[0])
        got, got_scores = fused.generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, output_scores=True)
        assert got[0].tolist() == want_ids
        finite = torch.isfinite(want_scores)
        assert torch.equal(torch.isfinite(got_scores[0]), finite)  # contrastive: the same tokens cut
        torch.testing.assert_close(got_scores[0][finite].double(), want_scores[finite], atol=2e-5, rtol=1e-5)
        # every position of a whole-sequence forward is the same rule (what log-likelihood scoring reads)
        with torch.no_grad():
            every = fused(torch.tensor([want_ids])).logits[0]
            logits = [m(input_ids=torch.tensor([want_ids])).logits[0] for m in models]
        naive = torch.stack([_naive_scores(method, [z[i] for z in logits], fusion.weights, fusion.alpha)
                             for i in range(len(want_ids))])  # fmt: skip
        finite = torch.isfinite(naive)
        torch.testing.assert_close(every[finite].double(), naive[finite], atol=2e-5, rtol=1e-5)
    assert any(differs)  # the other members changed the decoding
    if method == "contrastive":
        assert not finite.all()  # the plausibility cut-off removed tokens


def test_fused_ensemble_of_one_model_generates_as_transformers_does(members):
    """The decoding loop (left padding, positions, KV caches, EOS padding) matches model.generate."""
    model, tokenizer = members[0].model, members[0].tokenizer
    fused = FusedModel([model], Fusion("ensemble", (1.0,)), vocab=model.config.vocab_size)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    ids, mask = scoring.padded(encoded, tokenizer.pad_token_id, left=True)
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    got = fused.generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=tokenizer.pad_token_id)
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize(("method", "count"), [("ensemble", 3), ("dexperts", 3), ("contrastive", 2)])
def test_batched_fused_generation_equals_unbatched(trio, method, count):
    loaded = load_fused(trio[:count], check_fusion(method, count, None, None))
    one_by_one = scoring.generate_until(loaded.model, loaded.tokenizer, PROMPTS, ("\n",), 12, batch_size=1)
    batched = scoring.generate_until(loaded.model, loaded.tokenizer, PROMPTS, ("\n",), 12, batch_size=3)
    assert batched == one_by_one
    assert len(set(batched)) > 1  # the prompts lead to different continuations


def test_ensemble_log_likelihood_is_the_mixture_of_the_members(trio, members):
    loaded = load_fused(trio[:2], check_fusion("ensemble", 2, [0.25, 0.75], None))
    requests = [("hello", " world"), ("a b", " c d e")]
    got = scoring.loglikelihood(loaded.model, loaded.tokenizer, requests)
    tokenizer = members[0].tokenizer
    for (context, continuation), (total, _) in zip(requests, got, strict=True):
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        cont = tokenizer(context + continuation, add_special_tokens=False)["input_ids"][len(ctx) :]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            probs = [torch.softmax(m.model(input_ids=ids).logits[0].double(), -1) for m in members[:2]]
        mixture = 0.25 * probs[0] + 0.75 * probs[1]
        want = sum(math.log(mixture[len(ctx) - 1 + i, token]) for i, token in enumerate(cont))
        assert total == pytest.approx(want, abs=1e-4)


def test_evaluate_fused_scores_tasks_and_counts_every_member(trio, tmp_path):
    """An ensemble of a model with itself scores exactly as the model; the footprint adds both members up."""
    alone = evaluate(trio[0], ["dates", "probe"], limit=3, footprint=False)
    twice = evaluate([trio[0], trio[0]], ["dates", "probe"], limit=3, fuse="ensemble")
    for task in ("dates", "probe"):
        for key, value in alone["results"][task].items():
            if isinstance(value, float):
                assert twice["results"][task][key] == pytest.approx(value, rel=1e-4), (task, key)
    assert twice["samples"]["dates"] == alone["samples"]["dates"]
    single = sum(p.numel() for p in load_model(trio[0]).model.parameters())
    assert twice["footprint"]["params_total"] == twice["footprint"]["params_active"] == 2 * single
    assert twice["config"]["fuse"]["method"] == "ensemble"


def test_cli_fuse_writes_members_into_the_run_record(trio, tmp_path, monkeypatch, capsys):
    out = tmp_path / "fused"
    code, _, err = run_cli(
        monkeypatch, capsys, "eval", "--fuse", "dexperts", *trio, "-t", "dates", "--limit", "2",
        "--no-footprint", "--fuse-alpha", "0.5", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    record = json.loads((out / "run.json").read_text())
    assert record["inputs"]["model"]["fuse"] == "dexperts"
    assert [m["folder"] for m in record["inputs"]["model"]["members"]] == [
        str(load_model(t).folder.resolve()) for t in trio
    ]
    assert json.loads((out / "results.json").read_text())["config"]["fuse"]["alpha"] == 0.5


def test_different_vocabularies_are_refused_in_one_line_and_nothing_written(
    trio, swapped_vocabulary_llama, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "never"
    code, stdout, err = run_cli(
        monkeypatch, capsys, "eval", "--fuse", "ensemble", trio[0], str(swapped_vocabulary_llama), "-t", "dates",
        "--out", str(out),
    )  # fmt: skip
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "vocabularies differ" in lines[0] and "share a tokenizer" in lines[0], err
    assert "Traceback" not in err + stdout
    assert not out.exists()


@pytest.mark.parametrize(
    ("models", "options", "words"),
    [
        (2, {}, "fuse them with --fuse"),
        (2, {"fuse": "dexperts"}, "exactly 3 models (BASE TUNED UNTUNED)"),
        (3, {"fuse": "contrastive"}, "exactly 2 models (STRONG WEAK)"),
        (2, {"fuse": "ensemble", "fuse_weights": [1.0]}, "one non-negative weight per model"),
        (2, {"fuse": "ensemble", "fuse_alpha": 0.3}, "takes no alpha"),
        (2, {"fuse": "contrastive", "fuse_alpha": 1.5}, "in (0, 1]"),
        (1, {"fuse_alpha": 0.3}, "without --fuse"),
        (2, {"fuse": "mixture"}, "unknown --fuse 'mixture'"),
    ],
)
def test_fusion_mistakes_are_one_line_before_loading(trio, tmp_path, models, options, words):
    refs = [str(tmp_path / "not_there")] * models  # never loaded: the check comes first
    with pytest.raises(UserError, match=None) as error:
        run_eval(refs if models > 1 else refs[0], ["dates"], out_dir=tmp_path / "out", **options)
    assert words in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_contrastive_refuses_log_likelihood_tasks(trio, tmp_path):
    with pytest.raises(UserError, match="task probe scores log-likelihoods"):
        run_eval(trio[:2], ["dates", "probe"], out_dir=tmp_path / "out", fuse="contrastive")
    assert not (tmp_path / "out").exists()


def test_report_shows_a_fused_run_as_a_fusion_row_made_at_no_cost(trio, tmp_path):
    from lmforge.report.compare import compare

    base, _ = run_eval(trio[0], ["dates"], out_dir=tmp_path / "base", limit=2, footprint=False)
    fused, _ = run_eval(trio[:2], ["dates"], out_dir=tmp_path / "fused", limit=2, fuse="ensemble")
    comparison = compare([f"base={base}", f"ensemble={fused}"])
    row = comparison.rows[1]
    assert (row.family, row.method, row.cost["wall_s"]) == ("fusion", "fuse ensemble", 0.0)
    footprint = next(t for t in comparison.tables if t.title.startswith("footprint"))
    single = sum(p.numel() for p in load_model(trio[0]).model.parameters())
    total = f"{2 * single / 1e3:.1f} K"
    assert footprint.rows[1][1] == f"{total} ({total} active)"  # both members run for every token
    assert "ensemble" in comparison.verdicts  # judged like a merge: against the experts' gains
    unlabelled = compare([f"base={base}", str(fused)]).rows[1].label  # named after the fusion and its members
    assert unlabelled == f"ensemble({Path(trio[0]).name}+{Path(trio[1]).name})"
