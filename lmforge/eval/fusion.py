"""Fusion at generation time: several models that share a tokenizer, scored and decoded as one.

`FusedModel` wraps the members and is what the eval harness sees: `forward` returns the fused next-token
log-probabilities at every position (so log-likelihood and perplexity scoring work unchanged) and `generate`
decodes greedily from them, every member running once per step over the whole batch with its own KV cache.
The rules (`fuse`), on each member's log-softmax l_i:
- ensemble: the probability mixture log sum_i w_i exp(l_i), weights normalised to sum to 1;
- product: product of experts, log_softmax(sum_i w_i l_i) (Hinton 2002);
- dexperts: base + alpha (tuned - untuned), models in that order: DExperts (Liu et al. 2021,
  https://arxiv.org/abs/2105.03023) and proxy-tuning (Liu et al. 2024, https://arxiv.org/abs/2401.08565);
- contrastive: strong minus weak over the tokens the strong model gives at least alpha times its top
  probability, -inf elsewhere (contrastive decoding, Li et al. 2022, https://arxiv.org/abs/2210.15097).
Each rule is renormalised with a log-softmax, so the output is a distribution; log-softmax shifts cancel in
every rule, so these equal the papers' formulas on raw logits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import DynamicCache, GenerationConfig

from lmforge.errors import UserError
from lmforge.eval import scoring
from lmforge.models.load import LoadedModel, load_model

FUSIONS = ("ensemble", "product", "dexperts", "contrastive")
# Models each rule takes, and its alpha's default (None: the rule has no alpha).
_COUNTS = {"ensemble": (2, None), "product": (2, None), "dexperts": (3, 3), "contrastive": (2, 2)}
_ALPHA = {"ensemble": None, "product": None, "dexperts": 1.0, "contrastive": 0.1}


@dataclass(frozen=True)
class Fusion:
    """A fusion rule and its settings, checked: `weights` for ensemble/product, `alpha` for the other two."""

    method: str
    weights: tuple[float, ...] | None = None
    alpha: float | None = None


def parse_weights(text: str | None) -> list[float] | None:
    """'0.7,0.3' -> [0.7, 0.3] (the CLI's --fuse-weights)."""
    if not text:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"bad --fuse-weights '{text}': write one number per model, e.g. 0.7,0.3") from None


def check_fusion(method: str, n_models: int, weights: Sequence[float] | None, alpha: float | None) -> Fusion:
    """The rule with its defaults filled in, or a UserError naming the mistake (before any model loads)."""
    if method not in FUSIONS:
        raise UserError(f"unknown --fuse '{method}': use one of {', '.join(FUSIONS)}")
    low, high = _COUNTS[method]
    if n_models < low or (high is not None and n_models != high):
        wanted = f"exactly {high}" if high else f"at least {low}"
        order = {"dexperts": " (BASE TUNED UNTUNED)", "contrastive": " (STRONG WEAK)"}.get(method, "")
        raise UserError(f"--fuse {method} takes {wanted} models{order}, got {n_models}")
    if weights is not None and method not in ("ensemble", "product"):
        raise UserError(f"--fuse {method} takes no weights (they are for ensemble and product): drop them")
    if alpha is not None and _ALPHA[method] is None:
        raise UserError(f"--fuse {method} takes no alpha (it is for dexperts and contrastive): drop it")
    if weights is not None and (len(weights) != n_models or any(w < 0 for w in weights) or sum(weights) <= 0):
        raise UserError(
            f"fusion weights {list(weights)}: give one non-negative weight per model ({n_models}), not all 0"
        )
    if method == "contrastive" and alpha is not None and not 0 < alpha <= 1:
        raise UserError(f"contrastive alpha {alpha}: the plausibility cut-off must be in (0, 1]")
    default = [1.0 / n_models] * n_models if method == "ensemble" else [1.0] * n_models
    if method == "ensemble" and weights is not None:
        default = [w / sum(weights) for w in weights]
    elif weights is not None:
        default = list(weights)
    alpha = alpha if alpha is not None else _ALPHA[method]
    return Fusion(method, tuple(default) if method in ("ensemble", "product") else None, alpha)


def combine(fusion: Fusion, logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Fused log-probabilities (..., vocab) from each member's logits (..., vocab), in float32."""
    lp = [x.float().log_softmax(-1) for x in logits]
    if fusion.method == "ensemble":
        weighted = [p + (math.log(w) if w > 0 else -math.inf) for p, w in zip(lp, fusion.weights, strict=True)]
        return torch.logsumexp(torch.stack(weighted), dim=0)
    if fusion.method == "product":
        return sum(w * p for p, w in zip(lp, fusion.weights, strict=True)).log_softmax(-1)
    if fusion.method == "dexperts":
        base, tuned, untuned = lp
        return (base + fusion.alpha * (tuned - untuned)).log_softmax(-1)
    strong, weak = lp
    plausible = strong >= strong.max(dim=-1, keepdim=True).values + math.log(fusion.alpha)
    return (strong - weak).masked_fill(~plausible, -math.inf).log_softmax(-1)


class FusedModel(torch.nn.Module):
    """Members sharing a tokenizer, as one model to the harness: `forward(...).logits` are fused log-probs.

    Scoring projects final hidden states only where it scores (eval/scoring.py); here the "decoder" gives every
    member's states side by side and the "output embedding" turns a slice of them into fused log-probs, so a
    fused model never holds (batch x sequence x vocabulary) logits per member either. `config.fused` names the
    rule; `max_position_embeddings` is the shortest member's context.
    """

    def __init__(
        self, members: Sequence[torch.nn.Module], fusion: Fusion, vocab: int, folders: Sequence[Path] = ()
    ) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.fusion, self.vocab = fusion, vocab
        self.folders = list(folders)
        """Where each member was loaded from (size on disk, fingerprints)."""
        contexts = [getattr(m.config, "max_position_embeddings", None) for m in members]
        self.config = SimpleNamespace(fused=fusion.method, max_position_embeddings=min(c for c in contexts if c))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, logits_to_keep: int = 0):
        """Fused log-probs (batch, seq or the last `logits_to_keep`, vocab) as `.logits`."""
        logits = [
            m(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep).logits
            for m in self.members
        ]
        return SimpleNamespace(logits=combine(self.fusion, [x[..., : self.vocab] for x in logits]))

    def get_decoder(self):
        """For scoring: a callable giving every member's final hidden states, concatenated on the last axis."""

        def states(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
            parts = [scoring.final_hidden_states(m, input_ids, attention_mask)[0] for m in self.members]
            return SimpleNamespace(last_hidden_state=torch.cat(parts, dim=-1))

        return states

    def get_output_embeddings(self):
        """For scoring: (..., concatenated states) -> fused log-probs (..., vocab), member by member."""
        widths, heads = [], []
        for m in self.members:
            if any(getattr(m.config, name, None) for name in scoring.LOGIT_TRANSFORMS):  # its states are logits
                widths.append(m.config.vocab_size)
                heads.append(lambda x: x)
            else:
                widths.append(m.get_output_embeddings().weight.shape[1])
                heads.append(m.get_output_embeddings())

        def head(states: torch.Tensor) -> torch.Tensor:
            parts = states.split(widths, dim=-1)
            return combine(self.fusion, [h(part)[..., : self.vocab] for h, part in zip(heads, parts, strict=True)])

        return head

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        stopping_criteria=None,
        max_new_tokens: int | None = None,
        min_new_tokens: int | None = None,
        do_sample: bool = False,
        pad_token_id: int | None = None,
        output_scores: bool = False,
    ):
        """Greedy decoding from the fused distribution, as `transformers` generates (left padding, EOS, stop
        criteria, finished rows padded); returns the sequences (batch, prompt + new), and with `output_scores`
        also the fused log-probs of every step (batch, new, vocab).
        """
        config = generation_config or GenerationConfig()
        if do_sample or config.do_sample:
            raise UserError("fused models decode greedily: sampling is not supported")
        max_new = max_new_tokens if max_new_tokens is not None else config.max_new_tokens
        min_new = min_new_tokens if min_new_tokens is not None else (config.min_new_tokens or 0)
        pad = pad_token_id if pad_token_id is not None else config.pad_token_id
        eos = config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens count from 0
        caches = [DynamicCache() for _ in self.members]
        scores = self._step(input_ids, mask, positions, caches)
        done = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
        sequences, steps = input_ids, []
        for step in range(max_new):
            if step < min_new and eos:
                scores[:, eos] = -math.inf
            steps.append(scores)
            token = scores.argmax(-1).masked_fill(done, pad if pad is not None else 0)
            sequences = torch.cat([sequences, token[:, None]], dim=-1)
            if eos:
                done |= torch.isin(token, torch.tensor(eos, device=token.device))
            if stopping_criteria is not None:
                done |= stopping_criteria(sequences, scores)
            if done.all() or step == max_new - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            positions = positions[:, -1:] + 1
            scores = self._step(token[:, None], mask, positions, caches)
        return (sequences, torch.stack(steps, dim=1)) if output_scores else sequences

    def _step(self, ids, mask, positions, caches) -> torch.Tensor:
        """Fused log-probs (batch, vocab) of the next token: each member's one forward over the batch."""
        logits = [
            m(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True).logits[
                :, -1, : self.vocab
            ]
            for m, cache in zip(self.members, caches, strict=True)
        ]
        return combine(self.fusion, logits)


def load_fused(
    refs: Sequence[str], fusion: Fusion, dtype: str = "float32", loaded: Sequence[LoadedModel] | None = None
) -> LoadedModel:
    """Load every member (or take them loaded) and wrap them; a UserError if their vocabularies differ.

    The first member's tokenizer serves all; `folder` is the first member's, `model.folders` all of them.
    """
    start = time.perf_counter()
    members = list(loaded) if loaded is not None else [load_model(ref, dtype=dtype) for ref in refs]
    first = members[0].tokenizer.get_vocab()
    for ref, member in zip(refs[1:], members[1:], strict=True):
        vocab = member.tokenizer.get_vocab()
        if vocab != first:
            differ = (
                f"{len(first)} vs {len(vocab)} tokens" if len(vocab) != len(first) else "the same tokens, other ids"
            )
            raise UserError(
                f"cannot fuse {refs[0]} and {ref}: their vocabularies differ ({differ}); fusion mixes next-token "
                "distributions token id by token id, so fuse models that share a tokenizer (fine-tunes of one base)"
            )
    widths = [m.model.get_output_embeddings().weight.shape[0] for m in members]
    vocab = min(widths)  # a padded embedding matrix has rows no token id reaches
    if vocab < len(members[0].tokenizer):
        raise UserError(f"cannot fuse: a model has {vocab} output rows for {len(members[0].tokenizer)} tokens")
    model = FusedModel([m.model for m in members], fusion, vocab, [Path(m.folder).resolve() for m in members])
    name = f"{fusion.method}({', '.join(str(r) for r in refs)})"
    return LoadedModel(model, members[0].tokenizer, name, members[0].folder, time.perf_counter() - start)
