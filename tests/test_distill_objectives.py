"""Distillation objectives equal a naive full-softmax implementation in value and gradients, chunked or not."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lmforge.distill.objectives import (
    OBJECTIVES,
    DenseTeacher,
    Objective,
    SparseTeacher,
    check_objectives,
    distill_loss,
    tail_logprob,
)
from lmforge.errors import UserError

VOCAB, DIM, TEACHER_DIM = 50, 16, 24


def _naive_divergence(loss: str, p_s: torch.Tensor, p_t: torch.Tensor, beta: float, alpha: float) -> torch.Tensor:
    """Per-token divergences written from the papers' formulas on probabilities (float64), no shared code."""

    def kl(p, q):
        return (p * (p.log() - q.log())).sum(-1)

    if loss == "forward_kl":
        return kl(p_t, p_s)
    if loss == "reverse_kl":
        return kl(p_s, p_t)
    if loss == "jsd":  # TRL generalized_jsd_loss: beta=0 forward KL, beta=1 reverse KL
        if beta == 0:
            return kl(p_t, p_s)
        if beta == 1:
            return kl(p_s, p_t)
        m = beta * p_t + (1 - beta) * p_s
        return beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)
    if loss == "skew_kl":
        return kl(p_t, alpha * p_t + (1 - alpha) * p_s)
    if loss == "skew_rkl":
        return kl(p_s, (1 - alpha) * p_t + alpha * p_s)
    if loss == "tv":
        return 0.5 * (p_s - p_t).abs().sum(-1)
    raise AssertionError(loss)


def _naive(hidden, weight, bias, t_hidden, t_weight, labels, objectives):
    """Full (batch, seq, vocab) logits of both models, float64, summed over labelled positions."""
    keep = labels[:, 1:] != -100
    z_s = (hidden @ weight.T + (0 if bias is None else bias))[:, :-1][keep].double()
    z_t = (t_hidden @ t_weight.T)[:, :-1][keep].double()
    targets = labels[:, 1:][keep]
    total = 0
    for o in objectives:
        if o.loss == "ce":
            total = total + o.weight * -torch.log_softmax(z_s, -1).gather(-1, targets[:, None]).sum()
            continue
        p_s, p_t = torch.softmax(z_s / o.temperature, -1), torch.softmax(z_t / o.temperature, -1)
        total = total + o.weight * o.temperature**2 * _naive_divergence(o.loss, p_s, p_t, o.beta, o.alpha).sum()
    return total


def _problem(masked: bool, seed: int = 0, with_bias: bool = False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 9, DIM, generator=g, dtype=torch.float64).requires_grad_()
    weight = (torch.randn(VOCAB, DIM, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    bias = torch.randn(VOCAB, generator=g, dtype=torch.float64).requires_grad_() if with_bias else None
    t_hidden = torch.randn(2, 9, TEACHER_DIM, generator=g, dtype=torch.float64)
    t_weight = torch.randn(VOCAB, TEACHER_DIM, generator=g, dtype=torch.float64) * 0.5
    labels = torch.randint(0, VOCAB, (2, 9), generator=g)
    if masked:
        labels[0, :4] = -100  # a prompt
        labels[1, 6:] = -100  # right padding
    return hidden, weight, bias, t_hidden, t_weight, labels


def _lmforge(hidden, weight, bias, t_hidden, t_weight, labels, objectives, chunk_size=4):
    keep = labels[:, 1:] != -100
    teacher = DenseTeacher(t_hidden[:, :-1][keep], t_weight)
    loss, stats = distill_loss(
        hidden[:, :-1][keep], weight, teacher, labels[:, 1:][keep], objectives, chunk_size=chunk_size, head_bias=bias
    )
    return loss, stats


def _check_same(objectives, masked, chunk_size=4, with_bias=False):
    hidden, weight, bias, t_hidden, t_weight, labels = _problem(masked, with_bias=with_bias)
    params = [p for p in (hidden, weight, bias) if p is not None]
    want = _naive(hidden, weight, bias, t_hidden, t_weight, labels, objectives)
    want_grads = torch.autograd.grad(want, params)
    got, stats = _lmforge(hidden, weight, bias, t_hidden, t_weight, labels, objectives, chunk_size)
    got_grads = torch.autograd.grad(got * 0.5, params)  # a non-unit upstream gradient, as the loop gives
    assert stats["tokens"] == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, 0.5 * w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_matches_naive(beta, temperature, masked):
    _check_same([Objective("jsd", temperature=temperature, beta=beta)], masked)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "tv", "ce"])
def test_divergences_match_naive(loss, temperature, masked):
    _check_same([Objective(loss, temperature=1.0 if loss == "ce" else temperature)], masked)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("loss", ["skew_kl", "skew_rkl"])
def test_skew_divergences_match_naive(loss, alpha, temperature):
    _check_same([Objective(loss, temperature=temperature, alpha=alpha)], masked=True)


def test_weighted_list_with_bias_matches_naive():
    objectives = [Objective("forward_kl", 0.7, 2.0), Objective("reverse_kl", 0.2), Objective("ce", 0.5)]
    _check_same(objectives, masked=True, with_bias=True)


@pytest.mark.parametrize("chunk_size", [1, 3, 5, 1000])
def test_chunked_equals_unchunked(chunk_size):
    hidden, weight, _, t_hidden, t_weight, labels = _problem(True, seed=3)
    objectives = [Objective("jsd", beta=0.3, temperature=1.5), Objective("ce", 0.5)]
    one, _ = _lmforge(hidden, weight, None, t_hidden, t_weight, labels, objectives, chunk_size=100_000)
    one_grads = torch.autograd.grad(one, [hidden, weight])
    many, _ = _lmforge(hidden, weight, None, t_hidden, t_weight, labels, objectives, chunk_size=chunk_size)
    many_grads = torch.autograd.grad(many, [hidden, weight])
    assert abs(one.item() - many.item()) <= 1e-5 * abs(one.item())
    for a, b in zip(one_grads, many_grads, strict=True):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_every_objective_is_zero_for_identical_distributions_and_jsd_is_bounded():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(6, VOCAB, generator=g).log_softmax(-1)
    t = (torch.randn(6, VOCAB, generator=g) * 8).log_softmax(-1)
    for name, fn in OBJECTIVES.items():
        if name != "ce":
            assert fn(s, s, Objective(name)).abs().max() < 1e-5, name
            assert (fn(s, t, Objective(name, beta=0.5, alpha=0.1)) > 0).all(), name
    for beta in (0.1, 0.5, 0.9):
        assert OBJECTIVES["jsd"](s, t, Objective("jsd", beta=beta)).max() <= math.log(2)


def test_sparse_top_k_signal_equals_bucketed_naive_and_dense_when_k_is_the_vocabulary():
    hidden, weight, _, t_hidden, t_weight, labels = _problem(True, seed=5)
    keep = labels[:, 1:] != -100
    rows, targets = hidden[:, :-1][keep], labels[:, 1:][keep]
    z_t = (t_hidden[:, :-1][keep] @ t_weight.T).float()

    def sparse(k, temperature):
        logp = (z_t / temperature).log_softmax(-1)
        top = z_t.topk(k, dim=-1).indices
        return SparseTeacher(top, {temperature: logp.gather(-1, top)}, {temperature: tail_logprob(logp, top)})

    objective = [Objective("forward_kl", temperature=2.0)]
    dense, _ = distill_loss(rows, weight, DenseTeacher(t_hidden[:, :-1][keep], t_weight), targets, objective)
    full, _ = distill_loss(rows, weight, sparse(VOCAB, 2.0), targets, objective)
    assert abs(full.item() - dense.item()) <= 1e-5 * dense.item()
    # With k < V, the naive bucketed divergence: top-k probabilities plus one bucket for the rest.
    k = 5
    got, _ = distill_loss(rows, weight, sparse(k, 2.0), targets, objective)
    p_s = torch.softmax((rows @ weight.T).double() / 2.0, -1)
    p_t = torch.softmax(z_t.double() / 2.0, -1)
    top = z_t.topk(k, dim=-1).indices
    b_s = torch.cat([p_s.gather(-1, top), 1 - p_s.gather(-1, top).sum(-1, keepdim=True)], -1)
    b_t = torch.cat([p_t.gather(-1, top), 1 - p_t.gather(-1, top).sum(-1, keepdim=True)], -1)
    want = 4.0 * (b_t * (b_t.log() - b_s.log())).sum()
    assert abs(got.item() - want.item()) <= 1e-4 * want.item()
    assert got.item() <= dense.item()  # buckets lose information: a lower bound of the full divergence
    with pytest.raises(UserError, match="temperatures"):
        distill_loss(rows, weight, sparse(k, 1.0), targets, objective)


def test_no_grad_and_empty_inputs():
    hidden, weight, _, t_hidden, t_weight, labels = _problem(True)
    with torch.no_grad():
        loss, _ = _lmforge(hidden, weight, None, t_hidden, t_weight, labels, [Objective("tv")])
    assert loss.item() > 0 and not loss.requires_grad
    empty = hidden[:0, 0]
    loss, stats = distill_loss(empty, weight, DenseTeacher(t_hidden[:0, 0], t_weight), labels[:0, 0], [Objective()])
    loss.backward()
    assert loss.item() == 0 and stats["tokens"] == 0 and weight.grad.abs().sum() == 0


@pytest.mark.parametrize(
    ("objective", "message"),
    [
        (Objective(temperature=0.0), "temperature must be > 0"),
        (Objective(temperature=-1.0), "temperature must be > 0"),
        (Objective("jsd", beta=1.5), r"beta must be in \[0, 1\]"),
        (Objective("jsd", beta=-0.1), r"beta must be in \[0, 1\]"),
        (Objective("skew_kl", alpha=2.0), r"alpha must be in \[0, 1\]"),
        (Objective(weight=-1.0), "weight must be >= 0"),
        (Objective("ce", temperature=2.0), "no temperature"),
    ],
)
def test_bad_objectives_are_one_line_errors(objective, message):
    with pytest.raises(UserError, match=message) as err:
        check_objectives([objective])
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="empty"):
        check_objectives([])


TRL_REFERENCE = Path(__file__).resolve().parent / "data" / "trl_gjsd_reference.json"


@pytest.mark.skipif(not TRL_REFERENCE.is_file(), reason="tests/data/trl_gjsd_reference.json not written yet")
def test_jsd_matches_trl_generalized_jsd_loss():
    """TRL 1.16's published values (bench/make_trl_gjsd_reference.py): equal per token and summed, where lmforge's
    loss is TRL's times T^2 (TRL applies no T^2), with gradients to match."""
    data = json.loads(TRL_REFERENCE.read_text())
    student = torch.tensor(data["student_logits"], dtype=torch.float64)  # (B, T, V), already shifted
    teacher = torch.tensor(data["teacher_logits"], dtype=torch.float64)
    labels = torch.tensor(data["labels"])
    eye = torch.eye(student.shape[-1], dtype=torch.float64)  # head = identity: the rows are the logits
    checked = 0
    for case in data["cases"]:
        beta, temperature = case["beta"], case["temperature"]
        objective = Objective("jsd", beta=beta, temperature=temperature)
        per_token = OBJECTIVES["jsd"](
            (student / temperature).log_softmax(-1), (teacher / temperature).log_softmax(-1), objective
        )
        torch.testing.assert_close(
            per_token, torch.tensor(case["per_token"], dtype=torch.float64), rtol=1e-9, atol=1e-12
        )
        keep = labels != -100 if case["masked"] else torch.ones_like(labels, dtype=torch.bool)
        if case["reduction"] not in ("sum", "batchmean") or (case["reduction"] == "batchmean" and not case["masked"]):
            continue  # "mean" also divides by V, unmasked batchmean by B: not per-token reductions
        rows = student[keep].clone().requires_grad_()
        loss, stats = distill_loss(rows, eye, DenseTeacher(teacher[keep], eye), labels.clamp_min(0)[keep], [objective])
        reduced = loss.item() / temperature**2 / (stats["tokens"] if case["reduction"] == "batchmean" else 1)
        assert reduced == pytest.approx(case["loss"], rel=1e-5)
        if "grad_student_logits" in case:
            (grad,) = torch.autograd.grad(loss, rows)
            want = torch.tensor(case["grad_student_logits"], dtype=torch.float64)[keep] * temperature**2
            torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-7)
        checked += 1
    assert checked == 30  # 5 betas x 2 temperatures x (sum masked, sum unmasked, batchmean masked)
