"""The model and a runner's loss function as one module, so an engine's wrapper sees the whole loss.

The chunked losses (train/chunked.py, distill/losses.py) reach past `model.forward()` to the decoder's
final hidden states and the head's weight. A DDP, FSDP or DeepSpeed wrapper only sees what runs inside the
`forward` of the module it wraps: its gradient hooks, its no-sync switch and (under sharding) its gathering
of parameters. So the loop wraps this module, not the model: `forward(batch)` calls the runner's
`loss_fn(model, batch)` on the model it holds and returns the summed loss, and every parameter the loss
touches belongs to the wrapped module. The runners keep their `loss_fn(model, batch)` signature.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

LossFn = Callable[[nn.Module, dict], tuple[torch.Tensor, dict]]


class LossModule(nn.Module):
    """`forward(batch) -> (loss summed over the batch's units, metrics)`: `loss_fn` on the held model."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model  # a submodule: its parameters are this module's, as a wrapper must see them
        self.loss_fn = loss_fn
        # Accelerate's FSDP2 wraps the decoder layers this list names (LlamaDecoderLayer, ...) one by one, reading
        # it from the module it prepares; without it the whole model would be one shard group
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        return self.loss_fn(self.model, batch)
