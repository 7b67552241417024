"""Router rows of a mixture of experts built from dense fine-tunes: one row per expert, per layer.

mergekit-moe's modes, reimplemented from its documented semantics [mk moe/router.py]: `hidden` runs the base
model on each expert's prompts (BOS + prompt, left-padded), takes the residual stream entering each layer at
the last token, averages over prompts, subtracts the same for the negative prompts and L2-normalises per
layer; `cheap_embed` does the same with the sum of token embeddings, one row for every layer; `random` and
`uniform_random` draw rows. Two lmforge modes read where a Mixtral router actually reads, the MLP input
(after the post-attention norm): `hidden_mlp` is `hidden` taken there, and `ridge` fits each layer's rows in
closed form, W = (X^T X + lam I)^-1 X^T Y over every prompt token X with its expert's one-hot label Y. The
hidden pass runs in float32 (mergekit loads bfloat16), so rows agree with mergekit's to bfloat16 precision.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch

log = logging.getLogger("lmforge.moe")

MERGEKIT_MODES = ("hidden", "cheap_embed", "random", "uniform_random")
LMFORGE_MODES = ("hidden_mlp", "ridge")
PROMPT_MODES = ("hidden", "cheap_embed", "hidden_mlp", "ridge")
# modes whose rows are averaged, unit-length prompt states: a high condition number means the prompts look alike;
# ridge rows are fitted to separate the prompts and need not be well conditioned, so they are not checked
AVERAGED_MODES = ("hidden", "cheap_embed", "hidden_mlp")
DEGENERATE_COND = 5.0  # mergekit's threshold on a layer's router-matrix condition number
RIDGE_LAMBDA = 1e-2  # ridge strength, relative to the mean diagonal of X^T X


def tokenize(tokenizer, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Prompts as mergekit feeds them: BOS text prepended, no other special tokens, left padding with BOS."""
    tokenizer.padding_side = "left"
    if tokenizer.bos_token_id is not None:
        tokenizer.pad_token_id = tokenizer.bos_token_id
    elif tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = [(tokenizer.bos_token or "") + p for p in prompts]
    return dict(tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False))


def gate_rows(
    mode: str,
    base: Path,
    groups: Sequence[tuple[Sequence[str], Sequence[str]]],
    num_layers: int,
    hidden: int,
    seed: int = 0,
    device: str = "cpu",
) -> torch.Tensor:
    """Router rows for each (positive prompts, negative prompts) group.

    Args:
        mode: one of MERGEKIT_MODES or LMFORGE_MODES.
        base: the base model folder (its tokenizer, embeddings and, for hidden modes, the model).
        groups: one entry per expert (routed first, then shared), prompts as given in the config.
        num_layers, hidden: the base model's layer count and width.
        seed: seed of the random modes.
        device: where the hidden-state pass runs.
    Returns:
        float32 tensor [num_layers, len(groups), hidden].
    """
    if mode == "random":
        return torch.randn((num_layers, len(groups), hidden), generator=torch.Generator().manual_seed(seed))
    if mode == "uniform_random":
        scale = math.sqrt(1.0 / hidden)
        rows = torch.rand((num_layers, len(groups), hidden), generator=torch.Generator().manual_seed(seed))
        return rows * 2 * scale - scale
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    if mode == "cheap_embed":
        from lmforge.merge.safetensors_io import index_folder, read_rows

        embed = read_rows(index_folder(base)["model.embed_tokens.weight"], dtype=torch.float32)
        return _contrast(groups, lambda prompts: _embedding_sum(embed, tokenize(tokenizer, prompts), num_layers))
    from lmforge.models.load import load_model

    model = load_model(base, dtype="float32", device=device).model
    if mode == "ridge":
        return ridge_rows(model, tokenizer, [positive for positive, _ in groups])
    reader = _residual_last if mode == "hidden" else _mlp_input_last
    return _contrast(groups, lambda prompts: reader(model, tokenize(tokenizer, prompts)))


def _contrast(groups, states) -> torch.Tensor:
    """mergekit's combination: positive minus negative mean state, L2-normalised per layer."""
    rows = []
    for positive, negative in groups:
        row = states(positive)
        if negative:
            row = row - states(negative)
        rows.append(row / row.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8))
    return torch.stack(rows, dim=1)  # [layers, experts, hidden]


def _embedding_sum(embed: torch.Tensor, batch: dict, num_layers: int) -> torch.Tensor:
    """Sum of every real token's embedding over all prompts, unit length, the same row for each layer."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    total = (embed[ids] * mask.unsqueeze(-1)).sum(dim=(0, 1))  # [hidden]
    return (total / total.norm().clamp(min=1e-8)).expand(num_layers, -1)


@torch.no_grad()
def _residual_last(model, batch: dict) -> torch.Tensor:
    """The residual stream entering each layer at the last position, averaged over prompts: [layers, hidden]."""
    batch = {k: v.to(model.device) for k, v in batch.items()}
    states = model(**batch, output_hidden_states=True).hidden_states[:-1]  # embeddings + layers 0..L-2
    return torch.stack([s[:, -1, :] for s in states]).mean(dim=1).float().cpu()


def mlp_inputs(model, batch: dict) -> list[torch.Tensor]:
    """What each layer's MLP reads (after the post-attention norm), per layer: [batch, seq, hidden]."""
    captured: list[torch.Tensor] = []
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().float().cpu()))
        for layer in model.model.layers
    ]
    try:
        with torch.no_grad():
            model(**{k: v.to(model.device) for k, v in batch.items()})
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def _mlp_input_last(model, batch: dict) -> torch.Tensor:
    return torch.stack([x[:, -1, :].mean(dim=0) for x in mlp_inputs(model, batch)])


def ridge_rows(model, tokenizer, prompt_sets: Sequence[Sequence[str]]) -> torch.Tensor:
    """Per layer, the least-squares rows (ridge-regularised) mapping each real prompt token's MLP input to its
    expert's one-hot label (centred, so an expert's logit is high relative to the others): [layers, E, hidden]."""
    features: list[list[torch.Tensor]] = []  # per expert, per layer: [tokens, hidden]
    for prompts in prompt_sets:
        batch = tokenize(tokenizer, prompts)
        keep = batch["attention_mask"].bool()
        features.append([x[keep] for x in mlp_inputs(model, batch)])
    count = len(prompt_sets)
    labels = torch.cat([torch.full((f[0].shape[0],), i) for i, f in enumerate(features)])
    target = torch.nn.functional.one_hot(labels, count).float() - 1.0 / count  # [tokens, E]
    rows = []
    for layer in range(len(features[0])):
        x = torch.cat([f[layer] for f in features]).double()  # [tokens, hidden]
        gram = x.T @ x
        lam = RIDGE_LAMBDA * gram.diagonal().mean()
        weight = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), x.T @ target.double())
        rows.append(weight.T.float())  # [E, hidden]
    return torch.stack(rows)


def degenerate_layers(rows: torch.Tensor, threshold: float = DEGENERATE_COND) -> list[int]:
    """Layers whose router matrix [E, hidden] has a condition number above `threshold`: prompts too alike."""
    return [i for i in range(rows.shape[0]) if float(torch.linalg.cond(rows[i].double())) > threshold]


def warn_degenerate(rows: torch.Tensor) -> list[int]:
    """Log one warning naming the layers whose rows barely separate the experts; returns those layers."""
    bad = degenerate_layers(rows)
    if bad:
        where = "every layer" if len(bad) == rows.shape[0] else "layers " + ", ".join(map(str, bad))
        log.warning(
            f"router rows of {where} have condition number > {DEGENERATE_COND:g}: the experts' prompts are too "
            "similar to separate, so some experts will rarely be chosen; give each expert more distinct prompts"
        )
    return bad
