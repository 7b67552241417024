"""Greedy soup and weight search on real tiny llamas: every trial is loaded and scored by the evaluation harness,
and an ingredient whose tensors do not fit the loaded model stops the merge with one line naming it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from merge_helpers import edit_weights, family, leftovers, weights
from safetensors.torch import save_file

from lmforge.errors import UserError
from lmforge.eval.run import evaluate, metrics_of
from lmforge.merge.plan import open_model
from lmforge.merge.run import merge
from lmforge.merge.soup import check_fits
from lmforge.models.load import load_model
from lmforge.models.tiny import make_tiny_llama


def _shifted(base: Path, out: Path, seed: int, scale: float) -> Path:
    """base + scale * N(0, 1) noise drawn from `seed` (a negative scale mirrors the same noise)."""
    shutil.copytree(base, out)
    generator = torch.Generator().manual_seed(seed)
    noisy = {k: v + scale * torch.randn(v.shape, generator=generator) for k, v in weights(base).items()}
    save_file(noisy, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def ingredients(tmp_path_factory):
    """Four fine-tune-like variants of one tiny llama. a and b carry mirrored noise, so their average is the base
    (better than either on any text: the base's logits are the flattest); d's noise is large enough to spoil any
    soup it joins. So the greedy search keeps some candidates and drops others."""
    root = tmp_path_factory.mktemp("soup")
    base = make_tiny_llama(root / "base", seed=0)
    return [
        _shifted(base, root / "a", seed=1, scale=0.3),
        _shifted(base, root / "b", seed=1, scale=-0.3),
        _shifted(base, root / "c", seed=2, scale=0.3),
        _shifted(base, root / "d", seed=3, scale=2.0),
    ]


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    task = tmp_path_factory.mktemp("soup_task") / "texts.jsonl"
    task.write_text("\n".join(json.dumps({"text": f"the cat sat on the mat {i}"}) for i in range(3)))
    return str(task)


def _perplexity(folder: Path, task: str) -> float:
    return metrics_of(evaluate(load_model(folder, device="cpu"), [task], limit=3, footprint=False))[task]["perplexity"][
        "value"
    ]


def _average(folders: list[Path]) -> dict[str, torch.Tensor]:
    """The uniform average of the models' safetensors, summed in the order given (as the soup sums)."""
    tensors = [weights(f) for f in folders]
    return {
        name: sum((t[name].float() for t in tensors[1:]), tensors[0][name].float()) / len(tensors)
        for name in tensors[0]
    }


def test_greedy_soup_scores_the_trial_it_loaded_and_writes_the_average_of_the_kept(ingredients, texts, tmp_path):
    config = {"merge_method": "greedy_soup", "models": [str(m) for m in ingredients], "parameters": {"task": texts}}
    config["parameters"]["limit"] = 3
    out = merge(config, tmp_path / "soup", progress=False)
    rows = json.loads((out / "run.json").read_text())["soup"]
    by_ref = {str(m): m for m in ingredients}
    assert rows[0]["kept"] and {r["model"] for r in rows} == set(by_ref)
    assert sum(r["kept"] for r in rows) >= 2 and not all(r["kept"] for r in rows)  # both branches ran

    # every trial's recorded score is the score of the hand-made average of the soup so far plus the candidate
    kept, best = [by_ref[rows[0]["model"]]], rows[0]["soup_score"]
    for number, row in enumerate(rows[1:]):
        trial = tmp_path / f"trial{number}"
        shutil.copytree(ingredients[0], trial)
        save_file(_average([*kept, by_ref[row["model"]]]), trial / "model.safetensors", metadata={"format": "pt"})
        assert row["soup_score"] == pytest.approx(_perplexity(trial, texts), rel=1e-5)
        assert row["kept"] == (row["soup_score"] < best)
        if row["kept"]:
            kept.append(by_ref[row["model"]])
            best = row["soup_score"]

    executed = yaml.safe_load((out / "lmforge.yaml").read_text())
    assert executed["merge_method"] == "linear" and [m["model"] for m in executed["models"]] == [str(k) for k in kept]
    written, start = weights(out), weights(kept[0])
    for name, value in _average(kept).items():
        torch.testing.assert_close(written[name], value)
    assert not torch.allclose(
        written["model.layers.0.self_attn.q_proj.weight"], start["model.layers.0.self_attn.q_proj.weight"]
    )
    assert _perplexity(out, texts) == pytest.approx(best, rel=1e-5)


def _renamed(folders: list[Path], root: Path) -> list[Path]:
    """Copies whose final norm is stored as model.final_norm.weight: consistent with each other, not with llama."""
    copies = [shutil.copytree(f, root / f.name) for f in folders]
    for copy in copies:
        edit_weights(
            copy, lambda w: {("model.final_norm.weight" if k == "model.norm.weight" else k): v for k, v in w.items()}
        )
    return copies


def _one_line(config: dict, out: Path, *words: str) -> None:
    with pytest.raises(UserError) as caught:
        merge(config, out, progress=False)
    message = str(caught.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert not out.exists() and leftovers(out.parent) == []


def test_soup_ingredients_whose_names_differ_from_the_model_are_refused(ingredients, texts, tmp_path):
    a, b = _renamed(ingredients[:2], tmp_path)
    config = {"merge_method": "greedy_soup", "models": [str(a), str(b)], "parameters": {"task": texts, "limit": 3}}
    _one_line(
        config,
        tmp_path / "out",
        f"greedy soup ingredient {a}",
        "model.final_norm.weight",
        str(a / "model.safetensors"),
        "not a parameter of the LlamaForCausalLM that the trials load into",
    )


def test_a_soup_ingredient_with_an_extra_tensor_is_named(ingredients, texts, tmp_path):
    odd = shutil.copytree(ingredients[1], tmp_path / "odd")
    edit_weights(odd, lambda w: w | {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)})
    config = {
        "merge_method": "greedy_soup",
        "models": [str(ingredients[0]), str(odd)],  # the merge plan follows the first; odd's extra is its own
        "parameters": {"task": texts, "limit": 3},
    }
    _one_line(config, tmp_path / "out", f"ingredient {odd}", "model.layers.0.self_attn.rotary_emb.inv_freq")


def test_weight_search_inputs_whose_names_differ_from_the_model_are_refused(ingredients, texts, tmp_path):
    base, a, b = _renamed([ingredients[0].parent / "base", *ingredients[:2]], tmp_path)
    config = {
        "merge_method": "weight_search",
        "base_model": str(base),
        "models": [str(a), str(b)],
        "parameters": {"task": texts, "limit": 3, "weights": [1.0]},
    }
    _one_line(config, tmp_path / "out", f"weight search base {base}", "model.final_norm.weight", "not a parameter")


def test_check_fits_names_the_missing_and_the_misshaped_tensor_and_accepts_tied_embeddings(tmp_path, tiny_llama_tied):
    base, _ = family(tmp_path / "family", count=2)
    model = load_model(base, device="cpu").model
    assert "lm_head.weight" in check_fits(open_model("base", base), model, "ingredient")  # untied: its own tensor

    short = shutil.copytree(base, tmp_path / "short")
    edit_weights(short, lambda w: {k: v for k, v in w.items() if "layers.1.mlp.up_proj" not in k})
    with pytest.raises(UserError, match=r"ingredient short: missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        check_fits(open_model("short", short), model, "ingredient")

    wide = make_tiny_llama(tmp_path / "wide", hidden=48)
    with pytest.raises(
        UserError,
        match=r"tensor lm_head\.weight in .*wide/model\.safetensors has shape \[\d+, 48\] but .* expects \[\d+, 32\]",
    ):
        check_fits(open_model("wide", wide), model, "ingredient")

    tied = load_model(tiny_llama_tied, device="cpu").model
    names = check_fits(open_model("tied", tiny_llama_tied), tied, "ingredient")
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names  # loaded through the embedding
