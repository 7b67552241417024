"""ProFS: remove an unwanted behaviour by projecting a subspace out of MLP output weights, with no training.

Uppaal et al., "Model Editing as a Robust and Denoised Variant of DPO" (ProFS, arXiv 2405.13967, ICLR 2025),
section 3. Per edited layer: sentence embeddings of each pair's preferred and unwanted text (the layer's
output hidden states averaged over the non-pad tokens, prompt included), the paired differences (unwanted -
preferred; the sign does not change the subspace), centring (the differences projected off the direction of
the mean preferred embedding, the "stop-word" direction the paper removes; its released code removes the
top singular vector of the preferred embeddings, nearly the same direction), an SVD, and the top-k right
singular vectors as the unwanted subspace. The edit is W <- (I - P) W on the output side of the layer's MLP
output projection (`mlp.down_proj`), so nothing that MLP writes into the residual stream lies in the subspace.
The functions here are pure tensor maths plus the hooks that read hidden states; run.py does the I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lmforge.errors import UserError

# "model.layers.12.mlp.down_proj" -> layer module "model.layers.12", index 12 (llama, mistral, qwen2, ...).
_DOWN_PROJ = re.compile(r"^(?P<layer>(?:.*\.)?(?P<index>\d+))\.mlp\.down_proj$")


def find_projections(model: nn.Module) -> dict[int, str]:
    """Layer index -> the name of that decoder layer's module, for every layer with an `mlp.down_proj` Linear.

    Raises:
        UserError: the model has no such projection (one line naming its architecture).
    """
    found = {}
    for name, module in model.named_modules():
        match = _DOWN_PROJ.match(name)
        if match and isinstance(module, nn.Linear):
            found[int(match["index"])] = match["layer"]
    if not found:
        architecture = type(model).__name__
        raise UserError(
            f"{architecture} has no <layer>.mlp.down_proj linear layer to edit: ProFS supports llama-style "
            "models (llama, mistral, qwen2, SmolLM2)"
        )
    return dict(sorted(found.items()))


def check_layers(layers: Sequence[int], available: Sequence[int]) -> list[int]:
    """The layers to edit, refused when one is not a layer of the model."""
    bad = [layer for layer in layers if layer not in available]
    if bad:
        raise UserError(
            f"layers {bad} out of range: this model's MLP layers are {min(available)}..{max(available)}; "
            "set layers to indices in that range"
        )
    return sorted(set(layers))


def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean over the non-pad tokens: hidden (batch, seq, dim), mask (batch, seq) of 0/1 -> (batch, dim) fp32."""
    weights = mask.to(torch.float32).unsqueeze(-1)  # (batch, seq, 1)
    return (hidden.float() * weights).sum(1) / weights.sum(1).clamp_min(1)


@contextmanager
def capture(model: nn.Module, mask: Tensor, layer_names: dict[int, str]) -> Iterator[dict[int, Tensor]]:
    """While open, a forward pass of `model` over rows masked by `mask` (batch, seq) fills the yielded dict:
    layer index -> (batch, dim) fp32 mean of that module's output over each row's non-pad tokens.

    A context rather than a forward of its own, so one pass can also score the rows (lmforge.edit.run).
    """
    captured: dict[int, Tensor] = {}

    def keep(index: int):
        def hook(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output  # (batch, seq, dim)
            captured[index] = masked_mean(hidden, mask.to(hidden.device)).cpu()

        return hook

    handles = [model.get_submodule(name).register_forward_hook(keep(i)) for i, name in layer_names.items()]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def sentence_embeddings(model: nn.Module, ids: Tensor, mask: Tensor, layer_names: dict[int, str]) -> dict[int, Tensor]:
    """Each named layer's output hidden states averaged over the non-pad tokens of each row.

    Args:
        model: a causal LM whose decoder layers are `layer_names` (see find_projections).
        ids, mask: (batch, seq) token ids and attention mask (1 = real token).
        layer_names: layer index -> module name; the layer's output (the residual stream after it) is read.
    Returns:
        layer index -> (batch, dim) fp32 embeddings.
    """
    device = next(model.parameters()).device
    with capture(model, mask, layer_names) as captured:
        # The decoder alone: the layers' outputs are all that is read, so the LM head's logits are never formed.
        model.get_decoder()(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    return captured


def unwanted_subspace(preferred: Tensor, unwanted: Tensor, k: int, centre: bool = True) -> Tensor:
    """Orthonormal basis of the unwanted subspace of one layer.

    Args:
        preferred, unwanted: (pairs, dim) sentence embeddings, row i of each from the same pair.
        k: how many top right singular vectors of the centred differences to keep (0 = none).
        centre: project the differences off the mean preferred embedding's direction first.
    Returns:
        (dim, k) fp32 basis with orthonormal columns.
    """
    if preferred.shape != unwanted.shape:
        raise ValueError(f"paired embeddings differ in shape: {tuple(preferred.shape)} vs {tuple(unwanted.shape)}")
    pairs, dim = preferred.shape
    if k > min(pairs, dim):
        raise UserError(f"k={k} needs at least {k} pairs (got {pairs}) and k <= hidden size {dim}: lower k")
    differences = (unwanted - preferred).float()  # (pairs, dim)
    if centre:
        mean = preferred.float().mean(0)
        direction = mean / mean.norm().clamp_min(1e-12)  # (dim,)
        differences = differences - torch.outer(differences @ direction, direction)
    _, _, vh = torch.linalg.svd(differences, full_matrices=False)  # vh (min(pairs, dim), dim)
    return vh[:k].T.contiguous()


def projector(basis: Tensor) -> Tensor:
    """P = V V^T for an orthonormal basis V (dim, k): (dim, dim)."""
    return basis @ basis.T


def project_out(weight: Tensor, basis: Tensor) -> Tensor:
    """(I - P) W for a Linear weight W (out, in) whose outputs live in the basis's space; same dtype as W.

    Computed as W - V (V^T W), which never forms I - P; with k = 0 the weight comes back unchanged.
    """
    if basis.shape[1] == 0:
        return weight
    w = weight.float()  # (out, in)
    v = basis.to(w.device, torch.float32)  # (out, k)
    return (w - v @ (v.T @ w)).to(weight.dtype)


@torch.no_grad()
def apply_edit(model: nn.Module, bases: dict[int, Tensor], layer_names: dict[int, str]) -> None:
    """Project each edited layer's `mlp.down_proj` weight off its basis, in place."""
    for index, basis in bases.items():
        linear = model.get_submodule(f"{layer_names[index]}.mlp.down_proj")
        linear.weight.copy_(project_out(linear.weight, basis))
