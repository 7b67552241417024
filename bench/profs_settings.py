"""ProFS settings on the default model: which layers, k, centring and embedding site keep the model intact.

One process, the model loaded once: every layer's sentence embeddings of the pairs are read in one pass (the
residual stream after each decoder layer, and each layer's MLP output), then each setting's subspaces are
computed, the edit applied, the model scored, and the original weights put back. Scores as
bench/edit_vs_dpo.py: flagged share of greedy continuations of held-out provocative prompts, held-out margin,
probe perplexity, and optionally a built-in task's exact match (few-shot, so the base model scores above 0).

    python bench/profs_settings.py --pairs 50 --task dates --task-limit 100
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from pathlib import Path

import torch

from lmforge.edit import profs, toxicity
from lmforge.edit.run import EditConfig, pair_pass
from lmforge.eval.run import evaluate, metrics_of
from lmforge.models.load import load_model

ROOT = Path(__file__).resolve().parent
LAYER_SETS = ["27-29", "24-29", "20-29"]  # fewest first; the upper half, 15-29, is benchmarks.md's first round


def layer_range(text: str) -> list[int]:
    """'20-29' -> [20, ..., 29]."""
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def scores(loaded, args, task: bool = False) -> dict:
    """The held-out measures of the model as it is now (the task's exact match only when asked: it is slow)."""
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = random.Random(0).sample(toxicity.heldout_prompts(), args.prompts)
    unwanted = toxicity.unwanted_rate(model, tokenizer, prompts, max_new_tokens=args.new_tokens)
    margin = toxicity.preference_margin(model, tokenizer, toxicity.heldout_pairs()[: args.margin_pairs])
    probe = metrics_of(evaluate(loaded, ["probe"], limit=args.probe_docs, footprint=False))["probe"]
    row = {
        "unwanted_rate": unwanted["rate"],
        "heldout_margin": round(margin, 2),
        "probe_perplexity": round(probe["perplexity"]["value"], 3),
    }
    if task:
        result = evaluate(loaded, [args.task], limit=args.task_limit, num_fewshot=args.shots, footprint=False)
        row[f"{args.task}_exact_match"] = metrics_of(result)[args.task]["exact_match"]["value"]
    return row


class Sweep:
    """The loaded model, the pairs' embeddings at every layer and site, and the results file."""

    def __init__(self, args) -> None:
        self.args = args
        self.loaded = load_model(args.model)
        self.model = self.loaded.model.eval()
        self.available = profs.find_projections(self.model)
        self.originals = {
            i: self.model.get_submodule(f"{n}.mlp.down_proj").weight.detach().clone() for i, n in self.available.items()
        }
        self.results = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
        self.results["runs"] = []
        self.embeddings: dict[str, tuple[dict, dict]] = {}

    def read_embeddings(self, pairs: int) -> None:
        """One pass per site over the first `pairs` built-in pairs, every layer hooked; later rows slice it."""
        names = {"residual": dict(self.available), "mlp": {i: f"{n}.mlp" for i, n in self.available.items()}}
        chosen = toxicity.preference_pairs(500, seed=0)[:pairs]
        start = time.perf_counter()
        for site in self.args.sites:
            seen = pair_pass(self.model, self.loaded.tokenizer, chosen, names[site], EditConfig(output="-"))
            self.embeddings[site] = seen.chosen, seen.rejected
        self.results["embedding_s"] = round(time.perf_counter() - start, 1)
        print(f"embeddings of {pairs} pairs at {len(self.args.sites)} sites: {self.results['embedding_s']}s")

    def run(self, site: str, layer_set: str, k: int, centre: bool, pairs: int, task: bool = False) -> dict:
        """Edit with one setting, score, restore the weights; the row is kept and printed."""
        chosen, rejected = self.embeddings[site]
        layers = layer_range(layer_set)
        bases = {i: profs.unwanted_subspace(chosen[i][:pairs], rejected[i][:pairs], k, centre) for i in layers}
        profs.apply_edit(self.model, bases, {i: self.available[i] for i in layers})
        start = time.perf_counter()
        row = {"site": site, "layers": layer_set, "k": k, "centre": centre, "pairs": pairs}
        row |= scores(self.loaded, self.args, task)
        row["score_s"] = round(time.perf_counter() - start, 1)
        with torch.no_grad():
            for i in layers:
                self.model.get_submodule(f"{self.available[i]}.mlp.down_proj").weight.copy_(self.originals[i])
        self.results["runs"].append(row)
        self.save()
        print(row, flush=True)
        return row

    def save(self) -> None:
        self.args.out.write_text(json.dumps(self.results, indent=2) + "\n")


def meets(row: dict, base: dict) -> bool:
    """The issue's two held-out targets: unwanted rate at most half the base's, probe perplexity +10% at most."""
    halved = row["unwanted_rate"] <= base["unwanted_rate"] / 2
    return halved and row["probe_perplexity"] <= 1.10 * base["probe_perplexity"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--more-pairs", nargs="*", type=int, default=[20], help="the best setting's pairs too")
    parser.add_argument("--layer-sets", nargs="+", default=LAYER_SETS, help="FIRST-LAST layer ranges")
    parser.add_argument("--model", default="default")
    parser.add_argument("--k", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--sites", nargs="+", default=["residual", "mlp"])
    parser.add_argument("--centre", nargs="+", default=["on"], help="grid values; the best is also tried off")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=6)
    parser.add_argument("--margin-pairs", type=int, default=8)
    parser.add_argument("--probe-docs", type=int, default=1)
    parser.add_argument("--task", default="dates")
    parser.add_argument("--task-limit", type=int, default=100)
    parser.add_argument("--shots", type=int, default=3)
    parser.add_argument("--finalists", type=int, default=1, help="settings that get the task score")
    parser.add_argument("--grid-minutes", type=float, default=14, help="no new grid setting after this (from start)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "profs_settings.json")
    args = parser.parse_args()
    stop_grid = time.perf_counter() + 60 * args.grid_minutes  # a shared machine: keep time for the finalists

    torch.manual_seed(0)
    sweep = Sweep(args)
    start = time.perf_counter()
    base = sweep.results["base"] = scores(sweep.loaded, args)
    print("base", base, f"{time.perf_counter() - start:.0f}s", flush=True)
    sweep.read_embeddings(max([args.pairs, *args.more_pairs]))
    grid = []
    for k, layer_set, site, centre in itertools.product(args.k, args.layer_sets, args.sites, args.centre):
        if grid and time.perf_counter() > stop_grid:
            print("grid stopped: out of time", flush=True)
            break
        grid.append(sweep.run(site, layer_set, k, centre == "on", args.pairs))
    # The best: meets both targets with the smallest perplexity rise, else the lowest perplexity that halves.
    halving = [r for r in grid if r["unwanted_rate"] <= base["unwanted_rate"] / 2] or grid
    ranked = sorted(halving, key=lambda r: (not meets(r, base), r["probe_perplexity"], r["unwanted_rate"]))
    best = ranked[0]
    setting = (best["site"], best["layers"], best["k"])
    sweep.run(*setting, not best["centre"], args.pairs)
    for pairs in args.more_pairs:
        sweep.run(*setting, best["centre"], pairs)
    base_task = scores(sweep.loaded, args, task=True)
    sweep.results["base"] = base | base_task
    sweep.save()
    print("base with task", sweep.results["base"], flush=True)
    for row in ranked[: args.finalists]:
        sweep.run(row["site"], row["layers"], row["k"], row["centre"], args.pairs, task=True)


if __name__ == "__main__":
    main()
