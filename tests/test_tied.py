"""A tied embedding's gradient during training: same values, no vocabulary-sized sum at the end of backward."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lmforge.data.chat import render_example
from lmforge.data.packing import collate
from lmforge.distill.objectives import DenseTeacher, Objective, distill_loss
from lmforge.distill.student import completion_rows
from lmforge.models.load import load_model
from lmforge.train.chunked import causal_lm_loss
from lmforge.train.tied import densify_gradients, lean_tied_embedding


@pytest.fixture
def tied(tiny_llama_tied):
    torch.manual_seed(0)
    loaded = load_model(tiny_llama_tied, device="cpu")
    records = [{"prompt": f"Add {a} and {b}.", "completion": str(a + b)} for a in range(3) for b in range(2)]
    rows = [vars(render_example(loaded.tokenizer, r)) for r in records]
    rows = [{**r, "position_ids": list(range(len(r["input_ids"])))} for r in rows]
    batch = collate(rows, loaded.tokenizer.pad_token_id)
    return loaded.model, batch


def sft_loss(model, batch):
    return causal_lm_loss(model, batch)[0]


def distill(model, batch):
    torch.manual_seed(1)
    vocab = model.get_output_embeddings().weight.shape[0]
    with torch.no_grad():  # the teacher: the same model with its head perturbed, as a fixed signal
        t_rows, t_weight, _, _ = completion_rows(model, batch, vocab)
        t_weight = t_weight + 0.1 * torch.randn_like(t_weight)
    rows, weight, _, targets = completion_rows(model, batch, vocab)
    objectives = [Objective("jsd", beta=0.5), Objective("ce", weight=0.5)]
    return distill_loss(rows, weight, DenseTeacher(t_rows, t_weight), targets, objectives, chunk_size=3)[0]


class BigOps(TorchDispatchMode):
    """Records the ops whose output has the embedding's shape."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.ops = shape, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.shape == self.shape and out.layout == torch.strided:
            self.ops.append(str(func.overloadpacket.__name__))
        return out


def gradients(model, batch, loss_fn, lean: bool):
    model.zero_grad(set_to_none=True)
    embedding = model.get_input_embeddings()
    with lean_tied_embedding(model) if lean else nullcontext() as active:
        loss = loss_fn(model, batch) / 7.0  # a non-unit upstream gradient, as the loop gives
        recorder = BigOps(embedding.weight.shape)
        with recorder:
            loss.backward()
        densify_gradients(list(model.parameters()))
    return {k: p.grad.clone() for k, p in model.named_parameters()}, recorder.ops, active


@pytest.mark.parametrize("loss_fn", [sft_loss, distill], ids=["sft", "distill"])
def test_same_gradients_without_a_summed_copy(tied, loss_fn):
    model, batch = tied
    embedding = model.get_input_embeddings()
    assert embedding.weight is model.get_output_embeddings().weight
    plain, plain_ops, _ = gradients(model, batch, loss_fn, lean=False)
    lean, lean_ops, active = gradients(model, batch, loss_fn, lean=True)
    assert active is True
    assert "embedding_dense_backward" in plain_ops and "add" in plain_ops  # what the lean path avoids
    assert "embedding_dense_backward" not in lean_ops and "add" not in lean_ops
    assert set(plain) == set(lean)
    for name in plain:
        torch.testing.assert_close(lean[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
    assert not embedding.sparse and not hasattr(embedding.weight, "_lmforge_grad_in_place")  # restored


def test_untied_or_frozen_embeddings_are_left_alone(tiny_llama):
    model = load_model(tiny_llama, device="cpu").model
    with lean_tied_embedding(model) as active:
        assert active is False and not model.get_input_embeddings().sparse


def test_distill_loss_backward_runs_once(tied):
    model, batch = tied
    loss = distill(model, batch)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        loss.backward()
