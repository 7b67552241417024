"""AdamW stepped inside the backward pass, one parameter at a time (`train.optimizer_in_backward`).

A training step normally holds every parameter's gradient at once before the optimiser runs: for full
fine-tuning that is one more copy of the model (297 MB for the 74M-parameter distillation student). Here
each parameter takes its AdamW step as soon as autograd has finished its gradient, and the gradient is freed
at once, so only the gradients still being formed are alive. The update is AdamW's own, parameter by
parameter; what it cannot do is clip the *global* gradient norm, which is known only after every parameter
has stepped (the LOMO recipe pays a second backward pass for it). The loop therefore requires
`max_grad_norm: null`, one backward pass per step and one process (see TrainConfig.optimizer_in_backward).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch


class StepInBackward:
    """One AdamW per parameter, stepped by a post-accumulate-grad hook; quacks like the loop's optimiser.

    `step()` and `zero_grad()` do nothing (the hooks did both); `param_groups` lists every parameter's group so
    the loop's learning-rate schedule reaches them all; `state_dict()` nests the per-parameter states.
    """

    def __init__(self, params: Sequence[torch.Tensor], make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]):
        self.optimizers = [make([param]) for param in params]
        self._squared_norm: torch.Tensor | float = 0.0

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self) -> None:
        """Nothing left to do: every parameter stepped during backward."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing left to do: every gradient was freed after its step."""

    def take_grad_norm(self) -> float:
        """The global L2 norm of the gradients stepped since the last call (for the log), and reset it."""
        norm, self._squared_norm = float(self._squared_norm) ** 0.5, 0.0
        return norm

    def state_dict(self) -> dict:
        return {"per_parameter": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        states = state["per_parameter"]  # KeyError: a checkpoint of an ordinary optimiser
        if len(states) != len(self.optimizers):
            raise ValueError(f"{len(states)} parameter states for {len(self.optimizers)} parameters")
        for optimizer, saved in zip(self.optimizers, states, strict=True):
            optimizer.load_state_dict(saved)

    @contextmanager
    def hooked(self) -> Iterator[None]:
        """While active, a parameter whose gradient is complete takes its step and drops the gradient."""
        handles = [
            optimizer.param_groups[0]["params"][0].register_post_accumulate_grad_hook(self._stepper(optimizer))
            for optimizer in self.optimizers
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _stepper(self, optimizer: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
        def step_now(param: torch.Tensor) -> None:
            if param.grad.is_sparse:  # a tied lookup whose head went unused (train/tied.py)
                param.grad = param.grad.to_dense()
            self._squared_norm = self._squared_norm + torch.linalg.vector_norm(param.grad, dtype=torch.float32) ** 2
            optimizer.step()
            param.grad = None

        return step_now
