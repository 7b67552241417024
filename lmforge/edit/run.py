"""`lmforge edit`: training-free editing of a model from preference pairs (ProFS), into a normal model folder.

Reads top to bottom: check the config, load and subsample the pairs (whole records, so a pair's two sides
never separate) and check k against them before the model loads, find the MLP output projections and the
layers to edit, render both sides the way `lmforge dpo` does (chat template, prompt included, EOS), one
forward pass of the unedited model that both reads every edited layer's sentence embeddings and scores the
pairs' log-likelihood margin, compute each layer's unwanted subspace and project it out of that layer's
`mlp.down_proj`, score the margin again, then write the folder: weights, tokenizer, lmforge.yaml, run.json
(the margin before and after, seconds per phase) and a model card. The forgetting report (eval:) is the same
as the training commands'. Method: lmforge/edit/profs.py.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lmforge import config as config_io
from lmforge.data.sources import load_records
from lmforge.edit import profs
from lmforge.edit.toxicity import preference_pairs
from lmforge.errors import UserError
from lmforge.eval.forgetting import EvalSettings, forgetting_table, print_forgetting, report_tasks, score
from lmforge.eval.run import metrics_of
from lmforge.finetune.dpo import collate_pairs, tokenize_pairs
from lmforge.models.load import load_model
from lmforge.outputs import CardTable, model_card, save_model, staged_output, write_run_files
from lmforge.report.record import RunMeter, run_record
from lmforge.train.chunked import sequence_logprobs

log = logging.getLogger("lmforge.edit")
MARGIN_PAIRS = 16
"""Pairs the before/after log-likelihood margin is measured on (the first of the pairs used). The margin before
comes free with the embeddings; after the edit it costs a pass of its own, which on 50 pairs was half the run
(bench/edit_vs_dpo.py: 265 of 462 s at 64 pairs), hence a small sample: a check that the edit acted."""
BUILTIN_PAIRS = "builtin:insults"
"""`data` naming lmforge's built-in insult/profanity pairs (lmforge.edit.toxicity, 300 pairs, seed 0)."""


@dataclass(frozen=True)
class EditConfig:
    """A training-free edit from preference pairs."""

    output: str
    """Output model folder."""
    data: str | None = None
    """Preference pairs file or folder: records {prompt, chosen, rejected}; or builtin:insults (300 built-in pairs)."""
    model: str = "default"
    """Model reference: default, a folder, a .gguf file or a hub id."""
    method: Literal["profs"] = "profs"
    """profs: project the pairs' unwanted subspace out of MLP output weights (arXiv 2405.13967)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Canonical key -> your key, e.g. {chosen: good, rejected: bad}."""
    layers: list[int] | None = None
    """Layer indices to edit; default the upper half of the model's layers."""
    k: int = 2
    """Dimension of the unwanted subspace removed per layer (0 leaves the model unchanged)."""
    centre: bool = True
    """Project the differences off the mean preferred embedding first (the paper's centring)."""
    site: Literal["residual", "mlp"] = "residual"
    """Where the embeddings are read: the residual stream after each edited layer (the paper), or that layer's
    MLP output (what the edited projection writes)."""
    limit: int | None = None
    """Use N pairs drawn at random with `seed` (all when unset)."""
    seed: int = 0
    """Seed of the pair subsample."""
    max_length: int = 256
    """Longer rendered texts are truncated."""
    batch_size: int = 16
    """Texts per forward pass when reading embeddings."""
    eval: EvalSettings = field(default_factory=EvalSettings)
    overwrite: bool = False
    """Replace an existing output folder."""

    def __post_init__(self) -> None:
        config_io.at_least(self, "k", 0)
        config_io.at_least(self, "limit", 1)
        config_io.at_least(self, "max_length", 2)
        config_io.at_least(self, "batch_size", 1)


def edit(
    config: str | Path | Mapping[str, Any] | EditConfig | None = None, overrides: Sequence[str] = (), **settings: Any
) -> Path:
    """Edit a model from preference pairs without training (ProFS) and write its folder; returns the folder.

    Args:
        config: a YAML file, a dict of the same keys, an EditConfig, or None (defaults).
        overrides: "key.sub=value" strings, as on the command line.
        settings: config keys as keyword arguments, applied last, e.g. output="runs/edit", data="pairs.jsonl",
            k=2, layers=[20, 21].
    """
    return run_edit(config_io.resolve(config, EditConfig, overrides, **settings))


def select_pairs(records: list[dict], limit: int | None, seed: int) -> list[dict]:
    """`limit` whole records drawn with `seed`, in file order (all of them without a limit)."""
    if limit is None or limit >= len(records):
        return records
    keep = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[i] for i in keep]


def load_pairs(cfg: EditConfig) -> list[dict]:
    """The preference records of cfg.data (or the built-in pairs); any other format is a user error."""
    if cfg.data == BUILTIN_PAIRS:
        return select_pairs([pair | {"format": "preference"} for pair in preference_pairs()], cfg.limit, cfg.seed)
    records = load_records(cfg.data, columns=cfg.columns or None)
    if records[0]["format"] != "preference":
        raise UserError(
            f"{cfg.data} holds {records[0]['format']} records, not preference pairs: edit needs prompt, chosen and "
            "rejected per record (map yours with columns, e.g. --columns chosen=good,rejected=bad)"
        )
    return select_pairs(records, cfg.limit, cfg.seed)


@dataclass
class PairPass:
    """What one forward pass over both sides of every pair gives: per layer, the (pairs, dim) embeddings of the
    chosen and of the rejected sides (row i of each from pair i), each pair's margin, and the tokens read."""

    chosen: dict[int, torch.Tensor]
    rejected: dict[int, torch.Tensor]
    margins: list[float]
    """log p(rejected | prompt) - log p(chosen | prompt) per pair, as toxicity.preference_margin."""
    tokens: int


@torch.no_grad()
def pair_pass(model, tokenizer, pairs: list[dict], layer_names: dict[int, str], cfg: EditConfig) -> PairPass:
    """Both sides of each pair rendered as `lmforge dpo` renders them (chat template, prompt included, EOS), one
    forward per batch that both scores the completions and reads the named layers (none: the margin alone)."""
    rows = tokenize_pairs(pairs, tokenizer, cfg.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    chosen: dict[int, list[torch.Tensor]] = {}
    rejected: dict[int, list[torch.Tensor]] = {}
    margins, tokens = [], 0
    per_batch = max(1, cfg.batch_size // 2)  # pairs per forward: batch_size texts
    for start in range(0, len(rows), per_batch):
        chunk = rows[start : start + per_batch]
        batch = collate_pairs(chunk, pad_id)  # the chosen sides, then the rejected sides
        tokens += int(batch["attention_mask"].sum())
        with profs.capture(model, batch["attention_mask"], layer_names) as seen:
            logps = sequence_logprobs(model, batch)  # (2 x pairs,)
        margins += (logps[len(chunk) :] - logps[: len(chunk)]).tolist()
        for layer, emb in seen.items():
            chosen.setdefault(layer, []).append(emb[: len(chunk)])
            rejected.setdefault(layer, []).append(emb[len(chunk) :])
    return PairPass(
        {layer: torch.cat(parts) for layer, parts in chosen.items()},
        {layer: torch.cat(parts) for layer, parts in rejected.items()},
        margins,
        tokens,
    )


def run_edit(cfg: EditConfig) -> Path:
    """Edit (ProFS), report the margin and forgetting, and write the output folder; returns its path."""
    meter = RunMeter()
    if not cfg.data:
        raise UserError("data is required: a preference file with prompt, chosen and rejected per record (--data)")
    output = Path(cfg.output)
    if output.exists() and not cfg.overwrite:
        raise UserError(f"output folder {output} exists: set overwrite: true (or --overwrite), or choose another")
    pairs = load_pairs(cfg)  # a bad pairs file or too few pairs fail before the model loads
    if cfg.k > len(pairs):
        raise UserError(f"k={cfg.k} needs at least {cfg.k} pairs, {cfg.data} gives {len(pairs)}: lower k or add pairs")
    phases = _Phases()
    loaded = load_model(cfg.model)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    available = profs.find_projections(model)
    upper_half = list(available)[len(available) // 2 :]
    layers = profs.check_layers(cfg.layers if cfg.layers is not None else upper_half, list(available))
    phases.done("load")

    tasks = report_tasks(cfg.eval)
    before = score(loaded, tasks, cfg.eval)
    phases.done("eval")
    layer_names = {layer: available[layer] for layer in layers}
    read_at = {layer: name + (".mlp" if cfg.site == "mlp" else "") for layer, name in layer_names.items()}
    seen = pair_pass(model, tokenizer, pairs, read_at, cfg)  # the margin before comes from the same pass
    phases.done("embeddings")
    bases = {i: profs.unwanted_subspace(seen.chosen[i], seen.rejected[i], cfg.k, cfg.centre) for i in layers}
    profs.apply_edit(model, bases, layer_names)
    phases.done("projection")
    margin_pairs = pairs[:MARGIN_PAIRS]
    margins_after = pair_pass(model, tokenizer, margin_pairs, {}, cfg).margins
    margin_before = sum(seen.margins[: len(margins_after)]) / len(margins_after)
    margin_after = sum(margins_after) / len(margins_after)
    phases.done("margin")
    after = score(loaded, tasks, cfg.eval)
    phases.done("eval")
    print_forgetting(before, after, "edited")
    log.info(
        "log p(rejected) - log p(chosen) on %d pairs: %.3f -> %.3f", len(margin_pairs), margin_before, margin_after
    )
    log.info("seconds: %s", ", ".join(f"{name} {seconds:.1f}" for name, seconds in phases.seconds.items()))

    with staged_output(output, overwrite=cfg.overwrite) as staging:
        save_model(staging, model, tokenizer)
        record = run_record(
            "edit",
            cfg.method,
            meter,
            inputs={"model": {"ref": cfg.model, "folder": str(loaded.folder)}},
            data={"path": cfg.data, "pairs": len(pairs)},
            config=config_io.to_dict(cfg),
            tokens_seen=seen.tokens,
            params_total=sum(p.numel() for p in model.parameters()),
            params_trainable=0,
            metrics=metrics_of(after) if after else {},
        )
        record["base_metrics"] = metrics_of(before) if before else {}
        record["edit"] = {"layers": layers, "k": cfg.k, "centre": cfg.centre, "site": cfg.site}
        record["phase_seconds"] = phases.seconds  # ProFS's own time (embeddings, projection) apart from the rest
        record["preference"] = {
            "pairs": len(margins_after),
            "margin_before": margin_before,
            "margin_after": margin_after,
        }
        write_run_files(staging, cfg, record, _model_card(cfg, layers, record["preference"], before, after))
    return output


class _Phases:
    """Wall seconds per phase of the run, summed when a phase comes back (the margin and eval run twice)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self._last, 2)
        self._last = now


def _model_card(cfg: EditConfig, layers: list[int], margin: dict, before: dict | None, after: dict | None) -> str:
    sentence = (
        f"Edited from `{cfg.model}` by lmforge without training (ProFS, arXiv 2405.13967): a {cfg.k}-dimensional "
        f"unwanted subspace projected out of the MLP output weights of layers {layers[0]}..{layers[-1]}."
    )
    rows = [[str(margin["pairs"]), f"{margin['margin_before']:+.3f}", f"{margin['margin_after']:+.3f}"]]
    table = CardTable(
        ["pairs", "margin before", "margin after"], rows, "log p(rejected) - log p(chosen), lower is better"
    )
    return model_card(Path(cfg.output).name, sentence, [table, forgetting_table(before, after, "edited")])
