"""Causal-LM cross-entropy from final hidden states, in chunks, so full-vocabulary logits never exist at once.

The usual loss forms (batch, seq, vocab) fp32 logits: 8 x 2048 tokens x 49k vocabulary is 3.2 GB before backward.
Here only labelled positions are gathered, then projected `chunk_size` rows at a time; forward keeps one
log-sum-exp per row and backward recomputes each chunk's logits to form softmax - one-hot, so the extra memory
is one chunk of logits [Liger-Kernel fused linear cross-entropy; Wijmans et al. 2024, arXiv:2411.09009]. A custom
autograd.Function rather than torch.utils.checkpoint: it saves just the inputs and the log-sum-exps, nothing per
chunk. Losses are sums, never means, so the caller normalises by the token count of the whole optimizer step and
gradient accumulation gives the same update as one big batch (DESIGN.md "Training").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.data.chat import IGNORE_INDEX
from lmforge.eval.scoring import LOGIT_TRANSFORMS
from lmforge.train.tied import add_into_grad, grad_in_place


def _logits(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """(chunk, dim) -> (chunk, vocab) fp32: projected in the model dtype like the model's own head, then upcast."""
    return F.linear(rows, weight, bias).float()


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Sum of -log softmax(rows @ weight.T + bias)[target] over rows, chunk by chunk in forward and backward."""

    @staticmethod
    def forward(ctx, rows: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk_size: int) -> Tensor:
        # rows (n, dim), weight (vocab, dim), bias (vocab,) or None, targets (n,)
        lse = torch.empty(len(rows), dtype=torch.float32, device=rows.device)  # (n,)
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        for start in range(0, len(rows), chunk_size):
            end = start + chunk_size
            logits = _logits(rows[start:end], weight, bias)  # (chunk, vocab)
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            total += (lse[start:end] - logits.gather(-1, targets[start:end, None]).squeeze(-1)).sum()
        ctx.save_for_backward(rows, weight, bias, targets, lse)
        ctx.chunk_size = chunk_size
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        rows, weight, bias, targets, lse = ctx.saved_tensors
        need_rows, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_rows = torch.empty_like(rows) if need_rows else None
        # Weight and bias gradients are summed over chunks in fp32, whatever the model dtype.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        for start in range(0, len(rows), ctx.chunk_size):
            end = start + ctx.chunk_size
            chunk = rows[start:end]  # (chunk, dim)
            grad = _logits(chunk, weight, bias).sub_(lse[start:end, None]).exp_()  # softmax (chunk, vocab)
            grad[torch.arange(len(chunk), device=grad.device), targets[start:end]] -= 1.0
            grad.mul_(grad_total)
            if grad_bias is not None:
                grad_bias += grad.sum(0)
            grad = grad.to(weight.dtype)
            if grad_rows is not None:
                grad_rows[start:end] = grad @ weight
            if grad_weight is not None:
                if grad.dtype == torch.float32:
                    grad_weight.addmm_(grad.T, chunk)
                else:
                    grad_weight += grad.T @ chunk
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
            if grad_in_place(weight):  # a tied embedding while training: no summed copy (train/tied.py)
                add_into_grad(weight, grad_weight)
                grad_weight = None  # already in .grad: autograd has nothing to add
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_rows, grad_weight, grad_bias, None, None


def chunked_cross_entropy(
    hidden: Tensor, head_weight: Tensor, labels: Tensor, chunk_size: int = 1024, head_bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Summed next-token cross-entropy of the output projection of `hidden`, one chunk of logits at a time.

    Labels are aligned as Hugging Face aligns them (unshifted): position t predicts labels[:, t + 1]; the shift
    happens here. Only positions whose target is not IGNORE_INDEX are projected at all.

    Args:
        hidden: (batch, seq, dim) final hidden states, after the final norm.
        head_weight: (vocab, dim) output projection (the lm_head weight).
        labels: (batch, seq) token ids, IGNORE_INDEX where no loss is taken.
        chunk_size: rows of logits formed at once; peak extra memory is chunk_size x vocab fp32.
        head_bias: (vocab,) output projection bias, if the head has one.

    Returns:
        (sum of token losses as an fp32 scalar, number of labelled tokens as an int64 scalar). With no labelled
        token the loss is 0 and still backpropagates (zero gradients), so every micro-batch can call backward.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on (batch, seq)")
    targets = labels[:, 1:]  # (batch, seq - 1): what each position but the last predicts
    keep = targets != IGNORE_INDEX  # (batch, seq - 1)
    rows = hidden[:, :-1][keep]  # (n, dim)
    loss = _ChunkedCrossEntropy.apply(rows, head_weight, head_bias, targets[keep], chunk_size)
    return loss, keep.sum()


def causal_lm_loss(model, batch: dict, chunk_size: int = 1024) -> tuple[Tensor, dict]:
    """Summed causal-LM loss of a Hugging Face model on a batch, and its metrics.

    The caller divides the summed loss by the labelled-token count of the whole optimizer step (all accumulated
    micro-batches and processes), not by each micro-batch's own count: a mean per micro-batch would weight a
    token in a short micro-batch more than one in a long micro-batch, so accumulation would not equal one batch.

    Batches with `position_ids` are packed rows (data.packing): they are run with no 2D attention mask and no
    KV cache, the only way transformers 5.x derives the per-example block-diagonal causal mask from restarting
    position ids (masking_utils._preprocess_mask_arguments). Such rows must be right-padded: under causal
    attention no real token sees a pad to its right, so dropping the mask changes nothing for them.

    Args:
        model: a causal LM (`get_decoder()` gives post-norm hidden states, `get_output_embeddings()` the head).
        batch: input_ids, attention_mask, labels (batch, seq), optionally position_ids (batch, seq).
        chunk_size: rows of logits formed at once.

    Returns:
        (summed fp32 loss, {"tokens": labelled-token count, "loss": mean loss per labelled token}).
    """
    batch = on_model_device(model, batch)
    inputs = model_inputs(batch)
    labels = batch["labels"]
    if any(getattr(model.config, name, None) for name in LOGIT_TRANSFORMS):
        # Softcapping or scaling sits between the head and the softmax: use the model's own full logits.
        logits = model(**inputs).logits  # (batch, seq, vocab)
        keep = labels[:, 1:] != IGNORE_INDEX
        loss = F.cross_entropy(logits[:, :-1][keep].float(), labels[:, 1:][keep], reduction="sum")
        tokens = keep.sum()
    else:
        hidden = model.get_decoder()(**inputs).last_hidden_state  # (batch, seq, dim)
        head = model.get_output_embeddings()
        loss, tokens = chunked_cross_entropy(hidden, head.weight, labels, chunk_size, getattr(head, "bias", None))
    count = int(tokens)
    return loss, {"tokens": count, "loss": loss.item() / count if count else 0.0}


def on_model_device(model, batch: dict) -> dict:
    """The batch with its tensors on the model's device: evaluators build batches on the CPU, and on a GPU
    machine the model is on the GPU. A no-op (no copy) where they already agree."""
    device = next(model.parameters()).device
    return {k: v.to(device) if torch.is_tensor(v) and v.device != device else v for k, v in batch.items()}


def model_inputs(batch: dict) -> dict:
    """Forward arguments for a batch: packed rows (with position_ids) go without the 2D mask (see causal_lm_loss)."""
    packed = batch.get("position_ids") is not None
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": None if packed else batch.get("attention_mask"),
        "position_ids": batch.get("position_ids"),
        "use_cache": False,  # a cache also turns off packed-sequence detection, and training never reads one
    }


def sequence_logprobs(model, batch: dict, chunk_size: int = 1024) -> Tensor:
    """Per-row sum of log p(label) over the labelled positions, with gradients (DPO's sequence log-likelihood).

    The same forward and chunked head as causal_lm_loss, but kept per row: each row's labelled positions go
    through the chunked cross-entropy on their own, so no (batch, seq, vocab) logits exist either. Rows must not
    be packed (one sequence per row), or the sum would cover several examples.

    Args:
        model: a causal LM, as for causal_lm_loss.
        batch: input_ids, attention_mask, labels (batch, seq); labels unshifted, IGNORE_INDEX where not scored.
        chunk_size: rows of logits formed at once.

    Returns:
        (batch,) fp32 log-likelihoods; 0 for a row with no labelled token.
    """
    batch = on_model_device(model, batch)
    inputs = model_inputs(batch)
    targets = batch["labels"][:, 1:]  # (batch, seq - 1)
    keep = targets != IGNORE_INDEX
    if any(getattr(model.config, name, None) for name in LOGIT_TRANSFORMS):
        logits = model(**inputs).logits[:, :-1].float()  # (batch, seq - 1, vocab)
        picked = logits.log_softmax(-1).gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
        return (picked * keep).sum(-1)
    hidden = model.get_decoder()(**inputs).last_hidden_state[:, :-1]  # (batch, seq - 1, dim)
    head = model.get_output_embeddings()
    bias = getattr(head, "bias", None)
    sums = [
        -_ChunkedCrossEntropy.apply(hidden[i][keep[i]], head.weight, bias, targets[i][keep[i]], chunk_size)
        for i in range(len(hidden))
    ]
    return torch.stack(sums)  # (batch,)
