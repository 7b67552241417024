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
LAYER_SETS = {"15-29": range(15, 30), "20-29": range(20, 30), "24-29": range(24, 30), "27-29": range(27, 30)}


def scores(loaded, args) -> dict:
    """The held-out measures of the model as it is now."""
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
    if args.task:
        result = evaluate(loaded, [args.task], limit=args.task_limit, num_fewshot=args.shots, footprint=False)
        row[f"{args.task}_exact_match"] = metrics_of(result)[args.task]["exact_match"]["value"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--layer-sets", nargs="+", default=list(LAYER_SETS))
    parser.add_argument("--k", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--sites", nargs="+", default=["residual", "mlp"])
    parser.add_argument("--centre", nargs="+", default=["on", "off"])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=6)
    parser.add_argument("--margin-pairs", type=int, default=8)
    parser.add_argument("--probe-docs", type=int, default=2)
    parser.add_argument("--task", default=None)
    parser.add_argument("--task-limit", type=int, default=100)
    parser.add_argument("--shots", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "profs_settings.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    loaded = load_model("default")
    model = loaded.model.eval()
    results = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "runs": []}
    start = time.perf_counter()
    results["base"] = scores(loaded, args)
    print("base", results["base"], f"{time.perf_counter() - start:.0f}s", flush=True)

    available = profs.find_projections(model)
    pairs = toxicity.preference_pairs(500, seed=0)[: args.pairs]
    names = {"residual": dict(available), "mlp": {i: f"{name}.mlp" for i, name in available.items()}}
    start = time.perf_counter()
    embeddings = {}
    for site in args.sites:  # one pass per site (hooks on every layer)
        seen = pair_pass(model, loaded.tokenizer, pairs, names[site], EditConfig(output="-"))
        embeddings[site] = seen.chosen, seen.rejected
    print(f"embeddings {time.perf_counter() - start:.0f}s", flush=True)

    originals = {i: model.get_submodule(f"{n}.mlp.down_proj").weight.detach().clone() for i, n in available.items()}
    for site, layer_set, k, centre in itertools.product(args.sites, args.layer_sets, args.k, args.centre):
        chosen, rejected = embeddings[site]
        layers = list(LAYER_SETS[layer_set])
        bases = {i: profs.unwanted_subspace(chosen[i], rejected[i], k, centre == "on") for i in layers}
        profs.apply_edit(model, bases, {i: available[i] for i in layers})
        start = time.perf_counter()
        row = {"site": site, "layers": layer_set, "k": k, "centre": centre, **scores(loaded, args)}
        row["score_s"] = round(time.perf_counter() - start, 1)
        with torch.no_grad():
            for i in layers:
                model.get_submodule(f"{available[i]}.mlp.down_proj").weight.copy_(originals[i])
        results["runs"].append(row)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(row, flush=True)


if __name__ == "__main__":
    main()
