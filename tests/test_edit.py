"""ProFS editing (lmforge edit): the projection's algebra, the edit on a tiny llama, and each bad input."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch
import yaml
from cli_helpers import run_cli
from rich.console import Console
from safetensors.torch import load_file

from lmforge import cli
from lmforge.edit import profs, toxicity
from lmforge.edit.run import EditConfig, pair_pass, run_edit, select_pairs
from lmforge.errors import UserError
from lmforge.models.load import load_model
from lmforge.recipe.runner import run_recipe


def _pairs(n: int) -> list[dict]:
    return [
        {"prompt": f"Question {i}: what do you say?", "chosen": f"kind words {i}", "rejected": f"rude words {i} !!"}
        for i in range(n)
    ]


def _write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(next(folder.glob("*.safetensors"))))


def test_projection_is_idempotent_and_orthogonal_to_the_kept_subspace():
    gen = torch.Generator().manual_seed(0)
    preferred, unwanted = torch.randn(12, 16, generator=gen), torch.randn(12, 16, generator=gen)
    basis = profs.unwanted_subspace(preferred, unwanted, k=3)  # (16, 3)
    p = profs.projector(basis)
    keep = torch.eye(16) - p
    assert torch.allclose(basis.T @ basis, torch.eye(3), atol=1e-5)
    assert torch.allclose(p @ p, p, atol=1e-5)
    assert torch.allclose(keep @ keep, keep, atol=1e-5)
    assert torch.allclose(p @ keep, torch.zeros(16, 16), atol=1e-5)  # removed and kept spaces are orthogonal
    weight = torch.randn(16, 8, generator=gen)
    edited = profs.project_out(weight, basis)
    assert torch.allclose(profs.project_out(edited, basis), edited, atol=1e-5)  # editing twice = once
    assert torch.allclose(basis.T @ edited, torch.zeros(3, 8), atol=1e-5)
    # Centring: the mean preferred embedding's direction is not part of the subspace.
    mean = preferred.mean(0) / preferred.mean(0).norm()
    assert torch.allclose(basis.T @ mean, torch.zeros(3), atol=1e-5)


def test_subspace_holds_the_top_directions_of_the_differences():
    gen = torch.Generator().manual_seed(1)
    preferred = 10 * torch.randn(40, 16, generator=gen)  # texts differ far more than the pairs do
    toxic = torch.zeros(16)
    toxic[3] = 1.0  # every unwanted text moves along one direction, by a varying amount
    unwanted = preferred + torch.randn(40, 1, generator=gen).abs().add(2) * toxic + 0.01 * torch.randn(40, 16)
    basis = profs.unwanted_subspace(preferred, unwanted, k=1, centre=False)
    assert abs(float(basis[3, 0])) > 0.99
    # Subsampling never mixes two pairs: shuffling one side's rows destroys the shared direction.
    shuffled = profs.unwanted_subspace(preferred, unwanted[torch.randperm(40, generator=gen)], k=1, centre=False)
    assert abs(float(shuffled[3, 0])) < 0.9


def test_embeddings_equal_a_naive_masked_mean(tiny_llama):
    loaded = load_model(str(tiny_llama))
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    layer_names = profs.find_projections(model)
    assert layer_names == {0: "model.layers.0", 1: "model.layers.1"}
    rows = [tokenizer(text)["input_ids"] for text in ("hello there friend", "hi", "a much longer sentence here")]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    batched = profs.sentence_embeddings(model, ids, mask, layer_names)
    for i, row in enumerate(rows):
        with torch.no_grad():  # each text alone, unpadded, through the model's own hidden-state output
            states = model(input_ids=torch.tensor([row]), output_hidden_states=True).hidden_states
        naive = sum(states[1][0, t] for t in range(len(row))) / len(row)  # layer 0's output
        assert torch.allclose(batched[0][i], naive, atol=1e-5)
        alone = profs.sentence_embeddings(model, torch.tensor([row]), torch.ones(1, len(row)), layer_names)
        assert torch.allclose(batched[1][i], alone[1][0], atol=1e-5)
    # site=mlp reads the layer's MLP output instead: the same masked mean, of what the MLP writes.
    at_mlp = profs.sentence_embeddings(model, ids, mask, {1: "model.layers.1.mlp"})
    seen = []
    handle = model.get_submodule("model.layers.1.mlp").register_forward_hook(lambda _m, _i, out: seen.append(out))
    for i, row in enumerate(rows):
        with torch.no_grad():
            model(input_ids=torch.tensor([row]))
        assert torch.allclose(at_mlp[1][i], seen[-1][0].mean(0), atol=1e-5)
        assert not torch.allclose(at_mlp[1][i], batched[1][i], atol=1e-3)  # not the residual stream
    handle.remove()


def test_select_pairs_keeps_whole_pairs():
    records = _pairs(40)
    picked = select_pairs(records, 7, seed=3)
    assert len(picked) == 7 and picked != select_pairs(records, 7, seed=4)
    for pair in picked:
        number = pair["chosen"].split()[-1]
        assert pair["rejected"] == f"rude words {number} !!" and pair["prompt"].startswith(f"Question {number}:")
    assert select_pairs(records, None, 0) == records


def test_pair_pass_rows_are_aligned_and_its_margin_is_the_margin(tiny_llama, tmp_path):
    loaded = load_model(str(tiny_llama))
    names = {1: "model.layers.1"}
    pairs = _pairs(5)
    cfg = EditConfig(output=str(tmp_path / "x"), batch_size=4)  # 2 pairs a forward: pairs 3 and 4 share one
    seen = pair_pass(loaded.model, loaded.tokenizer, pairs, names, cfg)
    alone = pair_pass(loaded.model, loaded.tokenizer, pairs[3:4], names, cfg)
    assert seen.chosen[1].shape == (5, 32) and len(seen.margins) == 5
    assert torch.allclose(seen.chosen[1][3], alone.chosen[1][0], atol=1e-5)
    assert torch.allclose(seen.rejected[1][3], alone.rejected[1][0], atol=1e-5)
    assert not torch.allclose(seen.chosen[1][3], seen.rejected[1][3], atol=1e-3)
    # The same forward scores the pairs: its margins are those of toxicity.preference_margin, pair by pair.
    assert seen.margins[3] == pytest.approx(alone.margins[0], abs=1e-4)
    expected = toxicity.preference_margin(loaded.model, loaded.tokenizer, pairs)
    assert sum(seen.margins) / 5 == pytest.approx(expected, abs=1e-4)


def test_edited_layer_writes_nothing_along_the_removed_directions(tiny_llama, tmp_path):
    loaded = load_model(str(tiny_llama))
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    names = profs.find_projections(model)
    cfg = EditConfig(output=str(tmp_path / "x"))
    seen = pair_pass(model, tokenizer, _pairs(20), {1: names[1]}, cfg)
    basis = profs.unwanted_subspace(seen.chosen[1], seen.rejected[1], k=2)
    outputs = {}
    for index in (0, 1):
        model.get_submodule(f"model.layers.{index}.mlp.down_proj").register_forward_hook(
            lambda _m, _i, out, index=index: outputs.__setitem__(index, out.detach())
        )
    ids = torch.tensor([tokenizer("some text to run through the model")["input_ids"]])
    model(input_ids=ids)
    assert (outputs[1] @ basis).abs().max() > 1e-3  # before the edit the layer writes along them
    profs.apply_edit(model, {1: basis}, {1: names[1]})
    model(input_ids=ids)
    scale = outputs[1].abs().max()
    assert (outputs[1] @ basis).abs().max() < 1e-5 * scale  # edited layer: no component left
    assert (outputs[0] @ basis).abs().max() > 1e-3  # the unedited layer still writes along them


def test_edit_writes_a_model_folder_whose_change_is_a_rank_k_projection(tiny_llama, tmp_path, monkeypatch, capsys):
    data = _write(tmp_path / "pairs.jsonl", _pairs(30))
    out = tmp_path / "edited"
    flags = ["--method", "profs", "--data", data, "--out", str(out), "--model", str(tiny_llama)]
    monkeypatch.setattr(sys, "argv", ["lmforge", "edit", *flags, "--k", "2", "--layers", "1", "--limit", "20"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code in (0, None), capsys.readouterr().err
    assert {"lmforge.yaml", "run.json", "README.md", "config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    record = json.loads((out / "run.json").read_text())
    assert record["command"] == "edit" and record["method"] == "profs" and record["data"]["pairs"] == 20
    assert record["edit"] == {"layers": [1], "k": 2, "centre": True, "site": "residual"}
    assert record["preference"]["margin_after"] != record["preference"]["margin_before"]
    before, after = _weights(tiny_llama), _weights(out)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {"model.layers.1.mlp.down_proj.weight"}
    w, new = before["model.layers.1.mlp.down_proj.weight"], after["model.layers.1.mlp.down_proj.weight"]
    removed = w - new  # = P W: rank k, and orthogonal to what is kept, (I - P) W
    assert torch.linalg.matrix_rank(removed, atol=1e-4) == 2
    assert torch.allclose(new.T @ removed, torch.zeros(64, 64), atol=1e-4)


def test_k_zero_leaves_the_model_unchanged_bit_for_bit(tiny_llama, tmp_path):
    data = _write(tmp_path / "pairs.jsonl", _pairs(6))
    out = run_edit(EditConfig(output=str(tmp_path / "same"), data=data, model=str(tiny_llama), k=0, layers=[0, 1]))
    before, after = _weights(tiny_llama), _weights(out)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


def _gpt2_folder(tiny_llama, tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("mistake", ["no_chosen", "fewer_than_k", "layer_out_of_range", "no_mlp_projection"])
def test_bad_inputs_are_one_line_and_write_nothing(tiny_llama, tmp_path, mistake):
    pairs = _write(tmp_path / "pairs.jsonl", _pairs(4))
    settings = {"output": str(tmp_path / "out" / "edited"), "data": pairs, "model": str(tiny_llama)}
    expected = {
        "no_chosen": "chosen",
        "fewer_than_k": "k=5",
        "layer_out_of_range": "layers [7]",
        "no_mlp_projection": "GPT2LMHeadModel",
    }[mistake]
    if mistake == "no_chosen":
        records = [{"prompt": "q", "completion": "a"}, {"prompt": "r", "completion": "b"}]
        settings["data"] = _write(tmp_path / "sft.jsonl", records)
    elif mistake == "fewer_than_k":
        settings["k"] = 5
    elif mistake == "layer_out_of_range":
        settings["layers"] = [7]
    else:
        settings["model"] = str(_gpt2_folder(tiny_llama, tmp_path))
    with pytest.raises(UserError) as err:
        run_edit(EditConfig(**settings))
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("mistake", [["--layers", "9"], ["--k", "5"], ["--data", "missing.jsonl"]])
def test_cli_mistakes_print_one_line_without_a_traceback(tiny_llama, tmp_path, monkeypatch, capsys, mistake):
    pairs = _write(tmp_path / "pairs.jsonl", _pairs(4))
    out = tmp_path / "edited"
    flags = ["--data", pairs, "--out", str(out), "--model", str(tiny_llama), *mistake]
    code, _, err = run_cli(monkeypatch, capsys, "edit", *flags)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and "Traceback" not in err, err
    assert mistake[-1] in lines[0]  # names the layer, the k or the file
    assert not out.exists()


def test_builtin_pairs_are_flagged_only_on_the_unwanted_side():
    pairs = toxicity.preference_pairs(300, seed=0)
    assert len({(p["prompt"], p["rejected"]) for p in pairs}) > 200  # a few hundred distinct pairs
    assert all(toxicity.flagged(p["rejected"]) for p in pairs)
    assert not any(toxicity.flagged(p["chosen"]) or toxicity.flagged(p["prompt"]) for p in pairs)
    heldout = toxicity.heldout_prompts()
    assert len(heldout) == 128 and not any(toxicity.flagged(u + " " + o) for u, o in heldout)
    assert not {p["prompt"] for p in pairs} & {u for u, _ in heldout}
    held_pairs = toxicity.heldout_pairs()
    assert len(held_pairs) == 32 and not {p["prompt"] for p in pairs} & {p["prompt"] for p in held_pairs}
    assert all(toxicity.flagged(p["rejected"]) and not toxicity.flagged(p["chosen"]) for p in held_pairs)
    assert toxicity.flagged("What the FUCK.") and toxicity.flagged("a blow job") and not toxicity.flagged("hello")


def test_margin_is_rejected_minus_chosen(tiny_llama):
    loaded = load_model(str(tiny_llama))
    pairs = _pairs(3)
    swapped = [p | {"chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs]
    margin = toxicity.preference_margin(loaded.model, loaded.tokenizer, pairs)
    assert margin != 0
    assert margin == pytest.approx(-toxicity.preference_margin(loaded.model, loaded.tokenizer, swapped), abs=1e-4)


def test_recipe_edit_steps_are_the_edit_family_in_the_report(tiny_llama, tmp_path):
    """A recipe's `edit` step runs lmforge edit on the built-in pairs; the report judges edits by their margin."""
    scored = {"tasks": ["dates", "probe"], "limit": 2, "footprint": False}
    edit = {"model": str(tiny_llama), "data": "builtin:insults", "limit": 12, "layers": [1], "eval": {"limit": 2}}
    steps = [
        {"name": "base", "kind": "eval", "config": {**scored, "model": str(tiny_llama)}},
        {"name": "profs", "kind": "edit", "config": {**edit, "k": 2}},
        {"name": "unchanged", "kind": "edit", "config": {**edit, "k": 0}},
        {"name": "eval_profs", "kind": "eval", "config": {**scored, "model": "${steps.profs.output}"}},
        {"name": "eval_unchanged", "kind": "eval", "config": {**scored, "model": "${steps.unchanged.output}"}},
        {
            "name": "report",
            "kind": "compare",
            "config": {
                "baseline": "base",
                "runs": ["base=${steps.base.output}", "${steps.eval_profs.output}", "${steps.eval_unchanged.output}"],
            },
        },
    ]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"output": str(tmp_path / "out"), "steps": steps}), encoding="utf-8")
    root = run_recipe(path, isolate=False, console=Console(file=io.StringIO()))
    record = json.loads((root / "profs" / "run.json").read_text())
    assert record["command"] == "edit" and record["data"] == {"path": "builtin:insults", "pairs": 12}
    assert {"load", "margin", "embeddings", "projection", "eval"} == set(record["phase_seconds"])
    comparison = json.loads((root / "report" / "comparison.json").read_text())
    assert {row["label"]: row["family"] for row in comparison["rows"]} == {
        "base": "base",
        "profs": "edit",
        "unchanged": "edit",
    }
    margin = record["preference"]
    fell = margin["margin_after"] < margin["margin_before"]
    probe = {row["label"]: row["scores"]["probe"]["value"] for row in comparison["rows"]}
    kept = probe["profs"] <= 1.10 * probe["base"]  # an edit that costs general text does not pay off
    assert comparison["verdicts"]["profs"].startswith("paid off" if fell and kept else "did not pay off")
    assert f"{margin['margin_before']:+.2f} -> {margin['margin_after']:+.2f}" in comparison["verdicts"]["profs"]
    assert comparison["verdicts"]["unchanged"].startswith("did not pay off")  # k = 0: the margin cannot fall
    report = (root / "report" / "report.md").read_text()
    assert "| criterion | fine-tuning | distillation | merge | edit |" in report
    assert "preference pairs + the base model, no training |" in report
