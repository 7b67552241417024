"""Chunked cross-entropy equals the plain full-logits loss in value and gradients, and saves no logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.data.chat import IGNORE_INDEX
from lmforge.models.load import load_model
from lmforge.train.chunked import causal_lm_loss, chunked_cross_entropy, on_model_device, sequence_logprobs

VOCAB, DIM = 300, 32


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Equal within rtol of the expected tensor's largest magnitude (elementwise would fail near zero)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = expected.abs().max().clamp_min(1e-12)
    assert (actual - expected).abs().max() <= rtol * scale, (actual - expected).abs().max() / scale


def _naive(hidden, weight, labels, bias=None):
    """The reference: full (batch, seq, vocab) fp32 logits and F.cross_entropy over shifted labels."""
    logits = F.linear(hidden, weight, bias)[:, :-1]
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, (labels[:, 1:] != IGNORE_INDEX).sum()


def _random_problem(with_bias=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 21, DIM, generator=generator, requires_grad=True)
    weight = (torch.randn(VOCAB, DIM, generator=generator) * 0.3).requires_grad_()
    bias = torch.randn(VOCAB, generator=generator).requires_grad_() if with_bias else None
    labels = torch.randint(0, VOCAB, (2, 21), generator=generator)
    labels[0, :6] = IGNORE_INDEX  # a prompt
    labels[1, 15:] = IGNORE_INDEX  # right padding
    return hidden, weight, bias, labels


def _loss_and_grads(loss_fn, hidden, weight, bias, labels):
    loss, tokens = loss_fn(hidden, weight, labels, bias)
    # Gradients of the mean, as the training loop takes them: the upstream gradient is not 1.
    return loss, tokens, torch.autograd.grad(loss / tokens, [t for t in (hidden, weight, bias) if t is not None])


def _chunked(chunk_size):
    return lambda hidden, weight, labels, bias: chunked_cross_entropy(hidden, weight, labels, chunk_size, bias)


@pytest.mark.parametrize("chunk_size", [1, 7, 29, 1024])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_full_logits_in_value_and_gradients(chunk_size, with_bias):
    hidden, weight, bias, labels = _random_problem(with_bias)
    assert (labels[:, 1:] != IGNORE_INDEX).sum() == 29  # so 7 does not divide it, 29 equals it, 1024 exceeds it
    loss, tokens, grads = _loss_and_grads(_chunked(chunk_size), hidden, weight, bias, labels)
    ref_loss, ref_tokens, ref_grads = _loss_and_grads(_naive, hidden, weight, bias, labels)
    assert loss.dtype == torch.float32 and int(tokens) == int(ref_tokens) == 29
    _close(loss, ref_loss)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        _close(grad, ref_grad)


def test_bfloat16_inputs_give_bfloat16_gradients_close_to_the_reference():
    hidden, weight, _, labels = _random_problem()
    low = [hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()]
    loss, _, grads = _loss_and_grads(_chunked(8), *low, None, labels)
    ref_loss, _, ref_grads = _loss_and_grads(_naive, *low, None, labels)
    assert loss.dtype == torch.float32 and [g.dtype for g in grads] == [torch.bfloat16] * 2
    _close(loss, ref_loss, rtol=1e-3)  # the same bf16 projection (up to kernel choice), fp32 log-softmax in both
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        _close(grad.float(), ref_grad.float(), rtol=2e-2)


def test_fully_masked_labels_give_zero_loss_and_zero_gradients():
    hidden, weight, _, labels = _random_problem()
    labels[:] = IGNORE_INDEX
    loss, tokens = chunked_cross_entropy(hidden, weight, labels, chunk_size=4)
    loss.backward()  # an all-prompt micro-batch must still be able to call backward
    assert loss.item() == 0.0 and int(tokens) == 0
    assert torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)


def test_saves_no_more_than_one_chunk_of_logits_for_backward():
    hidden, weight, _, labels = _random_problem()
    chunk_size, tokens = 16, 29

    def largest_saved(fn) -> int:
        sizes = []

        def record(tensor):
            if tensor.data_ptr() not in (hidden.data_ptr(), weight.data_ptr()):  # inputs are alive anyway
                sizes.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(record, lambda tensor: tensor):
            fn()
        return max(sizes)

    naive = largest_saved(lambda: _naive(hidden, weight, labels))
    chunked = largest_saved(lambda: chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk_size))
    assert naive >= tokens * VOCAB  # the hook sees the full logits of the plain loss
    assert chunked <= chunk_size * VOCAB


def test_rejects_bad_chunk_size_and_misaligned_labels():
    hidden, weight, _, labels = _random_problem()
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError, match="disagree"):
        chunked_cross_entropy(hidden, weight, labels[:, 1:])


def _tiny_batch(tokenizer):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, len(tokenizer), (2, 13), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = ids.clone()
    labels[0, :4] = IGNORE_INDEX
    labels[mask == 0] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _model_grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("logit_transform", [False, True])
def test_causal_lm_loss_matches_the_models_own_logits_for_every_parameter(tiny_llama, logit_transform):
    loaded = load_model(tiny_llama, device="cpu")
    model = loaded.model.train()
    if logit_transform:  # llama ignores it, so the fallback must give the same numbers
        model.config.final_logit_softcapping = 30.0
    batch = _tiny_batch(loaded.tokenizer)
    loss, metrics = causal_lm_loss(model, batch, chunk_size=5)
    grads = _model_grads(model, loss)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref_loss = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    ref_grads = _model_grads(model, ref_loss)
    assert metrics["tokens"] == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == 17
    assert metrics["loss"] == pytest.approx(ref_loss.item() / 17, rel=1e-5)
    _close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) == 21
    for name, grad in grads.items():
        _close(grad, ref_grads[name])


@pytest.mark.parametrize("logit_transform", [False, True])
def test_sequence_logprobs_match_full_logits_per_row_with_gradients(tiny_llama, logit_transform):
    loaded = load_model(tiny_llama, device="cpu")
    model = loaded.model.train()
    if logit_transform:
        model.config.final_logit_softcapping = 30.0
    batch = _tiny_batch(loaded.tokenizer)
    batch["labels"][1, :] = IGNORE_INDEX  # a row with nothing scored gives 0
    weights = torch.tensor([0.7, -1.3])  # distinct upstream gradients per row, as DPO gives them
    got = sequence_logprobs(model, batch, chunk_size=3)
    grads = _model_grads(model, (got * weights).sum())
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    picked = logits[:, :-1].float().log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    want = (picked * (labels != IGNORE_INDEX)).sum(-1)  # (batch,)
    ref_grads = _model_grads(model, (want * weights).sum())
    assert got.shape == (2,) and got[1].item() == 0.0
    _close(got, want)
    for name, grad in grads.items():
        _close(grad, ref_grads[name])


def test_batches_follow_the_model_to_its_device():
    """Evaluators build batches on the CPU; on a GPU machine the model is on the GPU (meta stands in for it)."""
    batch = {"input_ids": torch.ones(1, 3, dtype=torch.long), "num_items": 1}
    moved = on_model_device(torch.nn.Linear(2, 2, device="meta"), batch)
    assert moved["input_ids"].device.type == "meta" and moved["num_items"] == 1
    assert on_model_device(torch.nn.Linear(2, 2), batch)["input_ids"] is batch["input_ids"]  # no copy
