"""A tied embedding's gradient without vocabulary-sized temporaries, while training.

Most small causal LMs (SmolLM2, Llama 3.2 1B, Qwen2.5 0.5B) use one matrix as input embedding and output head.
Autograd then makes, at the end of every backward pass, a dense (vocabulary x hidden) gradient for the
embedding lookup and a fresh buffer summing it with the head's gradient: two 113 MB buffers on SmolLM2,
the top of a CPU training step's memory. During training the lookup instead takes a sparse gradient (the
batch's rows only), and the chunked losses add the head's gradient straight into `.grad`, so the lookup's rows
land in that buffer in place. The update is the same: only where the sum is formed changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

_FLAG = "_lmforge_grad_in_place"


@contextmanager
def lean_tied_embedding(model: nn.Module) -> Iterator[bool]:
    """While active, a trainable tied embedding takes sparse gradients and its head gradient goes in place.

    Yields whether the model has such an embedding. Does nothing for untied or frozen embeddings (LoRA).
    """
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = (
        isinstance(embedding, nn.Embedding)
        and head is not None
        and embedding.weight is getattr(head, "weight", None)
        and embedding.weight.requires_grad
    )
    if not tied:
        yield False
        return
    was_sparse = embedding.sparse
    embedding.sparse = True
    setattr(embedding.weight, _FLAG, True)
    try:
        yield True
    finally:
        embedding.sparse = was_sparse
        delattr(embedding.weight, _FLAG)


def grad_in_place(tensor: Tensor) -> bool:
    """True for the weight whose gradient a chunked loss should add into `.grad` itself (see module doc)."""
    return tensor.is_leaf and getattr(tensor, _FLAG, False)


def add_into_grad(leaf: Tensor, grad: Tensor) -> None:
    """leaf.grad += grad in place (or takes `grad` as the buffer); the caller then returns None to autograd."""
    if leaf.grad is None:
        leaf.grad = grad
    else:
        leaf.grad.add_(grad)


def densify_gradients(parameters: list[Tensor]) -> None:
    """Sparse gradients (a tied lookup whose head went unused) become dense before clipping and the optimizer."""
    for parameter in parameters:
        if parameter.grad is not None and parameter.grad.is_sparse:
            parameter.grad = parameter.grad.to_dense()
