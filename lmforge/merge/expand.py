"""Block expansion (LLaMA Pro, Wu et al. 2024, https://arxiv.org/abs/2401.02415) as a passthrough recipe.

`merge_method: block_expansion` with one model and `num_new: P` splits the model's L layers into P equal
groups and, after each group, inserts a copy of the group's last block whose attention output projection
(`o_proj`) and MLP down projection (`down_proj`) are zero. Such a block adds nothing to the residual
stream, so the expanded model computes exactly what the original did, and fine-tuning only the new blocks
adds capacity without disturbing the old ones. The method is written as mergekit passthrough slices with
`scale` filters, so the plan, the engine and the written lmforge.yaml (which mergekit can also run) are
the ordinary ones.
"""

from __future__ import annotations

from lmforge.errors import UserError
from lmforge.merge.config import MergeConfig

ZEROED = ("o_proj", "down_proj")
_CARRIED = ("dtype", "out_dtype", "tokenizer_source", "tokenizer", "chat_template")


def to_passthrough(cfg: MergeConfig, layers: int) -> dict:
    """The mergekit config (a dict) that expands `cfg`'s one model of `layers` layers."""
    if not cfg.models or len(cfg.models) != 1 or cfg.base_model:
        raise UserError(f"{cfg.where}: block_expansion takes exactly one model under 'models' and no base_model")
    new = cfg.parameters.get("num_new", 1)
    if not isinstance(new, int) or new < 1 or layers % new:
        raise UserError(f"{cfg.where}: num_new must be a divisor of the model's {layers} layers, got {new!r}")
    model, group = cfg.models[0].model, layers // new
    zero = [{"filter": name, "value": 0.0} for name in ZEROED] + [{"value": 1.0}]
    slices = []
    for g in range(new):
        end = (g + 1) * group
        slices.append({"sources": [{"model": model, "layer_range": [g * group, end]}]})
        slices.append({"sources": [{"model": model, "layer_range": [end - 1, end], "parameters": {"scale": zero}}]})
    out = {"merge_method": "passthrough", "slices": slices}
    return out | {k: cfg.raw[k] for k in _CARRIED if cfg.raw.get(k) is not None}
