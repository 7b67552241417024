"""Distillation objectives: pure per-token divergences in one dict, and the chunked driver that applies them.

Every objective takes student and teacher log-probabilities over one support, (n, K) fp32, and returns (n,)
per-token values; `ce` takes the label ids instead of the teacher. The driver `distill_loss` combines a
weighted list of them, sum over trained tokens (never a mean: the training loop divides by the token count of
the whole optimiser step, so accumulation and processes give the same update as one big batch). At
temperature T each divergence is computed on softmax(z / T) of both models and multiplied by T^2 (Hinton et
al. 2015, arXiv:1503.02531), so the gradient scale does not shrink as T grows; `ce` is always at T = 1.

Memory: logits are formed from final hidden states `chunk_size` positions at a time, for both models, in
fp32, and only at trained positions. A custom autograd.Function takes each chunk's gradient with respect to
the student logits in forward (a local autograd graph over one chunk), turns it into gradients of the hidden
rows and the head weight, and keeps only those: backward just scales them [as train/chunked.py; Liger-Kernel].
The teacher signal is dense (teacher hidden rows + its head) or sparse (cached top-k log-probs plus a tail
bucket holding the remaining mass; both distributions are then compared over those k + 1 buckets, a lower
bound of the full divergence by the data-processing inequality).

References: generalized JSD as TRL's `generalized_jsd_loss` (GKD, Agarwal et al. 2024, arXiv:2306.13649:
beta = 0 is forward KL, beta = 1 reverse KL, else beta KL(t||m) + (1 - beta) KL(s||m), m = beta t + (1 - beta)
s); skew KL and skew reverse KL (DistiLLM, Ko et al. 2024, arXiv:2402.03898); total variation (Wen et al.
2023, arXiv:2307.15190).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.errors import UserError
from lmforge.train.tied import add_into_grad, grad_in_place


@dataclass(frozen=True)
class Objective:
    """One weighted term of the distillation loss."""

    loss: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_rkl", "tv", "ce"] = "forward_kl"
    """forward_kl KL(t||s), reverse_kl KL(s||t), jsd (beta), skew_kl / skew_rkl (alpha), tv, ce (labels)."""
    weight: float = 1.0
    """Multiplier of this term."""
    temperature: float = 1.0
    """Softmax temperature of both models (the term is scaled by T^2); ce ignores it and must keep 1.0."""
    beta: float = 0.5
    """jsd only: interpolation in [0, 1] (0 forward KL, 1 reverse KL, TRL's convention)."""
    alpha: float = 0.1
    """skew_kl / skew_rkl only: skew in [0, 1] (DistiLLM's default 0.1)."""


def _kl(p_log: Tensor, q_log: Tensor) -> Tensor:
    """KL(p || q) per row from log-probabilities (n, K) -> (n,)."""
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def forward_kl(s: Tensor, t: Tensor, o: Objective) -> Tensor:
    """KL(teacher || student): mode covering (Hinton's KD)."""
    return _kl(t, s)


def reverse_kl(s: Tensor, t: Tensor, o: Objective) -> Tensor:
    """KL(student || teacher): mode seeking (MiniLLM)."""
    return _kl(s, t)


def jsd(s: Tensor, t: Tensor, o: Objective) -> Tensor:
    """Generalized JSD with TRL's conventions: beta KL(t||m) + (1 - beta) KL(s||m), m = beta t + (1 - beta) s."""
    if o.beta == 0:
        return _kl(t, s)
    if o.beta == 1:
        return _kl(s, t)
    m = torch.logaddexp(s + math.log(1 - o.beta), t + math.log(o.beta))
    return o.beta * _kl(t, m) + (1 - o.beta) * _kl(s, m)


def skew_kl(s: Tensor, t: Tensor, o: Objective) -> Tensor:
    """KL(t || alpha t + (1 - alpha) s) (DistiLLM's alpha-skew KL)."""
    if o.alpha == 0:
        return _kl(t, s)
    if o.alpha == 1:
        return 0 * s.sum(-1)
    return _kl(t, torch.logaddexp(t + math.log(o.alpha), s + math.log(1 - o.alpha)))


def skew_rkl(s: Tensor, t: Tensor, o: Objective) -> Tensor:
    """KL(s || (1 - alpha) t + alpha s) (DistiLLM's alpha-skew reverse KL)."""
    if o.alpha == 0:
        return _kl(s, t)
    if o.alpha == 1:
        return 0 * s.sum(-1)
    return _kl(s, torch.logaddexp(t + math.log(1 - o.alpha), s + math.log(o.alpha)))


def tv(s: Tensor, t: Tensor, o: Objective) -> Tensor:
    """Total variation distance 1/2 sum |p_s - p_t|."""
    return 0.5 * (s.exp() - t.exp()).abs().sum(-1)


def ce(s: Tensor, t: Tensor, o: Objective) -> Tensor:
    """Cross-entropy on the labels: here `s` is the student's full log-softmax at T = 1 and `t` the label ids (n,)."""
    return -s.gather(-1, t[:, None]).squeeze(-1)


OBJECTIVES: dict[str, Callable[[Tensor, Tensor, Objective], Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_kl": skew_kl,
    "skew_rkl": skew_rkl,
    "tv": tv,
    "ce": ce,
}


def check_objectives(objectives: Sequence[Objective]) -> None:
    """One-line errors for settings with no meaning, before any model loads."""
    if not objectives:
        raise UserError("objectives is empty: give at least one, e.g. objectives=[{loss: forward_kl}]")
    for i, o in enumerate(objectives):
        where = f"objectives[{i}] ({o.loss})"
        if not o.temperature > 0:
            raise UserError(f"{where}: temperature must be > 0, got {o.temperature}")
        if not 0 <= o.beta <= 1:
            raise UserError(f"{where}: beta must be in [0, 1], got {o.beta}")
        if not 0 <= o.alpha <= 1:
            raise UserError(f"{where}: alpha must be in [0, 1], got {o.alpha}")
        if not o.weight >= 0:
            raise UserError(f"{where}: weight must be >= 0, got {o.weight}")
        if o.loss == "ce" and o.temperature != 1.0:
            raise UserError(f"{where}: cross-entropy on labels has no temperature: leave temperature at 1.0")


@dataclass
class DenseTeacher:
    """The teacher's final hidden states at the trained positions and its output head (no grad)."""

    hidden: Tensor  # (n, d_teacher)
    weight: Tensor  # (vocab, d_teacher), sliced to the shared vocabulary
    bias: Tensor | None = None

    def chunk(self, start: int, end: int) -> Tensor:
        return F.linear(self.hidden[start:end], self.weight, self.bias).float()  # (c, vocab) logits


@dataclass
class SparseTeacher:
    """Cached teacher signal at the trained positions: top-k token ids and, per temperature, their log-probs
    and the log of the remaining (tail) mass."""

    indices: Tensor  # (n, k) int64
    logprobs: dict[float, Tensor] = field(default_factory=dict)  # T -> (n, k) fp32
    tail: dict[float, Tensor] = field(default_factory=dict)  # T -> (n,) fp32


Teacher = DenseTeacher | SparseTeacher
TAIL_FLOOR = -1e4  # log of an empty tail bucket: exp() is 0 and 0 * (floor - x) stays finite


def tail_logprob(logp: Tensor, topk: Tensor) -> Tensor:
    """log of the mass outside the top-k ids, from a full (c, V) log-softmax; -> (c,)."""
    outside = logp.scatter(-1, topk, float("-inf"))
    return torch.logsumexp(outside, dim=-1).clamp_min(TAIL_FLOOR)


def _supports(s: Tensor, teacher: Teacher, start: int, end: int, temperature: float) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probs at temperature T over one support: the vocabulary, or top-k + tail.
    `s` is the student's (c, V) log-softmax at that temperature."""
    if isinstance(teacher, DenseTeacher):
        return s, (teacher.chunk(start, end) / temperature).log_softmax(-1)
    if temperature not in teacher.logprobs:
        raise UserError(
            f"the cached teacher signal holds temperatures {sorted(teacher.logprobs)}, not {temperature}: "
            "rebuild it (delete the cache) or use a cached temperature"
        )
    idx = teacher.indices[start:end]  # (c, k)
    s_buckets = torch.cat([s.gather(-1, idx), tail_logprob(s, idx)[:, None]], dim=-1)  # (c, k + 1)
    t_buckets = torch.cat([teacher.logprobs[temperature][start:end], teacher.tail[temperature][start:end, None]], -1)
    return s_buckets, t_buckets.float()


def token_losses(
    z_s: Tensor,
    teacher: Teacher,
    targets: Tensor,
    objectives: Sequence[Objective],
    start: int,
    stats: dict,
    ce_mask: Tensor | None = None,
) -> Tensor:
    """Weighted per-token loss (c,) of one chunk of student logits; per-objective sums are added to `stats`.
    `ce_mask` (c,) keeps `ce` off positions whose labels are not data (the student's own samples)."""
    total = torch.zeros(len(z_s), device=z_s.device)
    student: dict[float, Tensor] = {}  # T -> (c, V) student log-softmax, each formed once
    supports: dict[float, tuple[Tensor, Tensor]] = {}  # T -> (student, teacher) log-probs on one support
    end = start + len(z_s)

    def student_at(temperature: float) -> Tensor:
        if temperature not in student:
            student[temperature] = (z_s if temperature == 1 else z_s / temperature).log_softmax(-1)
        return student[temperature]

    for o in objectives:
        if o.loss == "ce":
            value = ce(student_at(1.0), targets, o)
            if ce_mask is not None:
                value = value * ce_mask
            scale = o.weight
        else:
            if o.temperature not in supports:
                supports[o.temperature] = _supports(student_at(o.temperature), teacher, start, end, o.temperature)
            s, t = supports[o.temperature]
            value = OBJECTIVES[o.loss](s, t, o)
            scale = o.weight * o.temperature**2
        detached = value.detach()
        stats[o.loss] = stats.get(o.loss, 0.0) + float(detached.sum())
        stats["nonfinite"] = stats.get("nonfinite", 0) + int((~torch.isfinite(detached)).sum())
        if o.loss != "ce":
            stats["negative"] = stats.get("negative", 0) + int((detached < -1e-4).sum())
        total = total + scale * value
    with torch.no_grad():  # entropies at T = 1, for the collapse guard
        logp = student[1.0].detach() if 1.0 in student else z_s.detach().log_softmax(-1)
        stats["student_entropy"] = stats.get("student_entropy", 0.0) + float(-(logp.exp() * logp).sum())
        if 1.0 in supports:
            t_logp = supports[1.0][1]
            stats["teacher_entropy"] = stats.get("teacher_entropy", 0.0) + float(-(t_logp.exp() * t_logp).sum())
    return total


class _ChunkedDistill(torch.autograd.Function):
    """Sum over rows of the weighted objectives of softmax(rows @ weight.T + bias), chunk by chunk; each chunk's
    gradients are taken in forward from a local graph, so no chunk's logits outlive it."""

    @staticmethod
    def forward(ctx, rows, weight, bias, teacher, targets, token_weights, ce_mask, objectives, chunk_size, stats, grad):
        # rows (n, d), weight (V, d), bias (V,) | None, targets (n,), token_weights (n,) | None, ce_mask (n,) | None
        need_rows, need_weight, need_bias = (grad and need for need in ctx.needs_input_grad[:3])
        grads = need_rows or need_weight or need_bias
        grad_rows = torch.zeros_like(rows) if need_rows else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        for start in range(0, len(rows), chunk_size):
            end = start + chunk_size
            chunk = rows[start:end]  # (c, d)
            with torch.enable_grad():
                z = F.linear(chunk.detach(), weight.detach(), None if bias is None else bias.detach()).float()
                z.requires_grad_(grads)
                mask = None if ce_mask is None else ce_mask[start:end]
                per_token = token_losses(z, teacher, targets[start:end], objectives, start, stats, mask)  # (c,)
                if token_weights is not None:
                    per_token = per_token * token_weights[start:end]
                chunk_total = per_token.sum()
            if grads:
                (g,) = torch.autograd.grad(chunk_total, z)  # (c, V) fp32
                if grad_bias is not None:
                    grad_bias += g.sum(0)
                g = g.to(weight.dtype)
                if grad_rows is not None:
                    grad_rows[start:end] = g @ weight
                if grad_weight is not None:
                    if weight.dtype == torch.float32:
                        grad_weight.addmm_(g.T, chunk)  # in place: no (V, d) temporary per chunk
                    else:
                        grad_weight += (g.T @ chunk).float()
            total += chunk_total.detach()
        # Held on ctx, not saved for backward: backward scales them in place and hands them over, once.
        ctx.grads = (grad_rows, grad_weight, grad_bias)
        ctx.inputs = (rows, weight, bias)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        if ctx.grads is None:
            raise RuntimeError("the chunked distillation loss supports one backward pass (no retain_graph)")
        out = []
        for g, given in zip(ctx.grads, ctx.inputs, strict=True):
            if g is not None:
                g = g.mul_(grad_total).to(given.dtype)
                if grad_in_place(given):  # a tied embedding while training: no summed copy (train/tied.py)
                    add_into_grad(given, g)
                    g = None  # already in .grad: autograd has nothing to add
            out.append(g)
        ctx.grads = ctx.inputs = None
        return (*out, None, None, None, None, None, None, None, None)


def distill_loss(
    rows: Tensor,
    head_weight: Tensor,
    teacher: Teacher,
    targets: Tensor,
    objectives: Sequence[Objective],
    token_weights: Tensor | None = None,
    chunk_size: int = 64,
    head_bias: Tensor | None = None,
    ce_mask: Tensor | None = None,
) -> tuple[Tensor, dict]:
    """Summed distillation loss over the trained positions, formed a chunk of logits at a time.

    Args:
        rows: (n, d) student final hidden states at the trained positions (those predicting a label).
        head_weight: (V, d) student output head, sliced to the vocabulary it shares with the teacher.
        teacher: DenseTeacher (hidden rows at the same positions + head) or SparseTeacher (cached top-k).
        targets: (n,) label ids (what `ce` trains towards).
        objectives: the weighted terms; each divergence at temperature T is scaled by T^2.
        token_weights: (n,) optional per-token multipliers (step-by-step's task weights).
        chunk_size: positions per chunk; peak extra memory is a few chunk x V fp32 buffers.
        head_bias: (V,) optional head bias.
        ce_mask: (n,) optional: 1 where `ce` applies (labels from data), 0 on the student's own samples.

    Returns:
        (fp32 scalar sum over tokens of the weighted loss, stats) where stats holds per-objective sums,
        counts of non-finite and negative divergence values, entropy sums and "tokens".
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if len(rows) != len(targets):
        raise ValueError(f"{len(rows)} hidden rows but {len(targets)} targets")
    stats: dict = {"tokens": len(rows)}
    if len(rows) == 0:  # still backpropagates (zero gradients), so every micro-batch can call backward
        return rows.sum() * 0.0 + head_weight.sum() * 0.0, stats
    loss = _ChunkedDistill.apply(
        rows,
        head_weight,
        head_bias,
        teacher,
        targets,
        token_weights,
        ce_mask,
        tuple(objectives),
        chunk_size,
        stats,
        torch.is_grad_enabled(),
    )
    return loss, stats
