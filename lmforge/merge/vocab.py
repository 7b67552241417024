"""The output tokenizer (`tokenizer_source`) and the re-mapping of embedding rows onto its vocabulary.

As mergekit does it [mk tokenizer/build.py, embed.py]: `base` keeps the base model's tokenizer, a model
reference takes that model's, `union` adds every other model's tokens to the base's. Each input's
vocabulary tensors (embeddings, lm_head) are then re-indexed to the output vocabulary; a token an input
lacks gets, in that input, the row of the only model that has it, else the base model's row, else the
mean of the models that have it (zeros if none has it). When every input already matches the output
vocabulary row for row, nothing is re-mapped and the tensors stream in row chunks as usual.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch

from lmforge.errors import UserError
from lmforge.merge.plan import InputModel


@dataclass
class Vocabulary:
    tokenizer: object
    size: int
    rows: dict[int, torch.Tensor]
    """Model number -> source row of each output token (-1: the model lacks it)."""

    def identity(self, numbers: list[int]) -> bool:
        """True when every listed model's rows [0, size) are the output vocabulary, in order."""
        expected = torch.arange(self.size)
        return all(torch.equal(self.rows[n], expected) for n in numbers)


def build(source: str, models: list[InputModel], base: int) -> Vocabulary:
    """The output tokenizer and each model's row map; `base` is the base (or first) model's number."""
    from transformers import AutoTokenizer

    def load(model: InputModel):
        try:
            return AutoTokenizer.from_pretrained(model.folder)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load the tokenizer of {model.ref}: {str(err).splitlines()[0]}") from None

    tokenizers = {i: load(m) for i, m in enumerate(models)}
    if source == "base":
        out = tokenizers[base]
    elif source == "union":
        out = _union(tokenizers, base, models)
    else:
        named = [i for i, m in enumerate(models) if m.ref == source]
        if not named:
            raise UserError(f"tokenizer_source '{source}' is not base, union or one of the merged models")
        out = tokenizers[named[0]]
    vocab = out.get_vocab()
    rows = {}
    for i, tokenizer in tokenizers.items():
        theirs, limit = tokenizer.get_vocab(), models[i].config.get("vocab_size") or len(tokenizer.get_vocab())
        row = torch.full((len(vocab),), -1, dtype=torch.long)
        for token, new_id in vocab.items():
            old = theirs.get(token, -1)
            row[new_id] = old if old < limit else -1
        rows[i] = row
    return Vocabulary(out, len(vocab), rows)


def _union(tokenizers: dict, base: int, models: list[InputModel]):
    """The base tokenizer plus every other model's tokens (within its embedding rows), in order."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as scratch:  # a fresh copy: add_tokens mutates
        tokenizers[base].save_pretrained(scratch)
        out = AutoTokenizer.from_pretrained(scratch)
    known = set(out.get_vocab())
    for i, tokenizer in tokenizers.items():
        limit = models[i].config.get("vocab_size") or len(tokenizer)
        added = {info.content: info for idx, info in tokenizer.added_tokens_decoder.items() if idx < limit}
        for token, idx in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
            if idx < limit and token not in known:
                out.add_tokens(added.get(token, token))
                known.add(token)
    return out


def align(tensors: list[torch.Tensor], numbers: list[int], vocab: Vocabulary, base: int | None) -> list[torch.Tensor]:
    """Each input's vocabulary tensor re-indexed to the output vocabulary (rows: tokens)."""
    maps = [vocab.rows[n] for n in numbers]
    present = torch.stack([m >= 0 for m in maps])  # [inputs, size]
    fill = torch.zeros((vocab.size, *tensors[0].shape[1:]), dtype=tensors[0].dtype)
    missing = (~present).any(dim=0).nonzero().flatten().tolist()
    for token in missing:
        have = present[:, token].nonzero().flatten().tolist()
        if len(have) == 1:
            fill[token] = tensors[have[0]][maps[have[0]][token]]
        elif base is not None and base in have:
            fill[token] = tensors[base][maps[base][token]]
        elif have:
            fill[token] = torch.stack([tensors[k][maps[k][token]] for k in have]).mean(dim=0)
    out = []
    for tensor, row, ok in zip(tensors, maps, present, strict=True):
        aligned = tensor[row.clamp(min=0)]
        aligned[~ok] = fill[~ok]
        out.append(aligned)
    return out
