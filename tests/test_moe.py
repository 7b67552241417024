"""`lmforge moe`: conformance with mergekit-moe 0.1.5, the output as transformers loads it, and bad inputs.

The experts are different fine-tunes of one tiny llama (the base plus seeded noise, merge_helpers.family).
The conformance tests run mergekit-moe from bench/.venv-mergekit on the same YAML (`make test` builds it;
missing, they skip locally and fail under CI=true) and compare every tensor: experts, attention, norms and
embeddings bit for bit, router rows within float tolerance (mergekit's hidden pass runs in bfloat16).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from merge_helpers import family, leftovers, perturbed, weights
from safetensors.torch import load_file

from lmforge.errors import UserError
from lmforge.merge import moe_router
from lmforge.merge.moe import moe
from lmforge.models.tiny import make_tiny_llama, make_tiny_qwen2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import peers  # noqa: E402
from needs import tool_missing  # noqa: E402

MERGEKIT_MOE = peers.MERGEKIT_VENV / "bin" / "mergekit-moe"
PROMPTS = (["the cat sat on the mat", "a dog ran home"], ["1 2 3 4 5", "seven eight nine"])


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    """[base, ft1, ft2]: a tiny llama and two different fine-tune-like variants."""
    return family(tmp_path_factory.mktemp("moe_family"), 3)


def moe_config(models: list[Path], mode: str = "hidden", **extra) -> dict:
    base, ft1, ft2 = models
    return {
        "base_model": str(base),
        "gate_mode": mode,
        "dtype": "float32",
        "experts_per_token": 1,
        "experts": [
            {"source_model": str(ft1), "positive_prompts": PROMPTS[0], "negative_prompts": ["one two"]},
            {"source_model": str(ft2), "positive_prompts": PROMPTS[1]},
        ],
        **extra,
    }


CASES = {
    "mixtral_hidden": lambda m: moe_config(m, "hidden"),
    "mixtral_cheap_embed": lambda m: moe_config(m, "cheap_embed"),
    "qwen_shared_cheap_embed": lambda m: moe_config(
        m, "cheap_embed", shared_experts=[{"source_model": str(m[0]), "positive_prompts": ["hello there"]}]
    ),
}
ROUTER_TOLERANCE = {"hidden": 2e-2, "cheap_embed": 1e-6}  # unit rows; mergekit's hidden pass is bfloat16


@pytest.fixture(scope="module")
def mergekit_outputs(models, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """case -> (its YAML, mergekit-moe's output folder); the mergekit runs go in parallel (CPU, no GPU)."""
    if peers.installed_version(peers.MERGEKIT_VENV / "bin" / "python", "mergekit") != "0.1.5":
        tool_missing("mergekit 0.1.5 is not in bench/.venv-mergekit: `make test` (or python bench/peers.py) builds it")
    root = tmp_path_factory.mktemp("mergekit_moe")
    runs, out = [], {}
    for case, make in CASES.items():
        config = root / f"{case}.yaml"
        config.write_text(yaml.safe_dump(make(models)))
        out[case] = (config, root / case)
        command = [str(MERGEKIT_MOE), str(config), str(root / case), "--device", "cpu", "--quiet"]
        runs.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for run in runs:
        log, _ = run.communicate(timeout=600)
        assert run.returncode == 0, log[-2000:]
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_tensors_as_mergekit_moe(case, mergekit_outputs, tmp_path):
    config, theirs_dir = mergekit_outputs[case]
    ours_dir = moe(config, tmp_path / "ours")
    ours, theirs = weights(ours_dir), weights(theirs_dir)
    assert sorted(ours) == sorted(theirs)
    mode = yaml.safe_load(config.read_text())["gate_mode"]
    routers = [name for name in theirs if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))]
    assert routers
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and ours[name].shape == tensor.shape, name
        if name in routers:
            assert torch.allclose(ours[name], tensor, atol=ROUTER_TOLERANCE[mode], rtol=0), name
        else:  # experts, attention, norms, embeddings: copied, so equal bit for bit
            assert torch.equal(ours[name], tensor), name
    ours_config = json.loads((ours_dir / "config.json").read_text())
    assert ours_config == json.loads((theirs_dir / "config.json").read_text())


def test_mixtral_output_loads_generates_and_is_the_dense_model_when_experts_agree(models, tmp_path):
    """Two copies of one fine-tune as experts, that fine-tune as base: MixtralForCausalLM must give the dense
    llama's logits (top-k weights sum to 1), so the layout, names and config are what transformers reads."""
    from transformers import AutoTokenizer, LlamaForCausalLM, MixtralForCausalLM

    ft1 = models[1]
    config = moe_config(models, experts_per_token=2) | {"base_model": str(ft1)}
    config["experts"][1]["source_model"] = str(ft1)
    out = moe(config, tmp_path / "moe", allow_all_same=True)
    mixture = MixtralForCausalLM.from_pretrained(out).eval()
    dense = LlamaForCausalLM.from_pretrained(ft1).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(["the cat sat on", "1 2 3"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(mixture(**batch).logits, dense(**batch).logits, atol=1e-5)
    generated = mixture.generate(**tokenizer(["hello"], return_tensors="pt"), max_new_tokens=6, do_sample=False)
    assert generated.shape[1] > 1
    record = json.loads((out / "run.json").read_text())
    assert record["command"] == "merge" and record["method"] == "moe"
    assert record["params_total"] == sum(p.numel() for p in mixture.parameters())
    per_expert = 3 * 32 * 64 * 2  # gate, up, down of hidden 32, intermediate 64, over 2 layers
    assert record["metrics"]["moe"]["params_active"] == record["params_total"]  # 2 of 2 experts per token
    assert (out / "lmforge.yaml").is_file() and (out / "README.md").is_file()
    one = moe(config | {"experts_per_token": 1}, tmp_path / "top1", allow_all_same=True)
    top1 = json.loads((one / "run.json").read_text())
    assert top1["metrics"]["moe"]["params_active"] == top1["params_total"] - per_expert


def test_qwen_output_with_shared_expert_loads_and_generates(models, tmp_path):
    from transformers import AutoTokenizer, Qwen2MoeForCausalLM

    out = moe(CASES["qwen_shared_cheap_embed"](models), tmp_path / "qwen")
    model = Qwen2MoeForCausalLM.from_pretrained(out).eval()
    assert model.config.num_experts == 2 and model.config.shared_expert_intermediate_size == 64
    tokenizer = AutoTokenizer.from_pretrained(out)
    generated = model.generate(**tokenizer(["hello"], return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > 1


def test_router_rows_separate_their_prompts(models):
    """hidden rows are unit length per layer; ridge rows send most of their own prompts' tokens to their expert."""
    from transformers import AutoTokenizer

    from lmforge.models.load import load_model

    groups = [(list(p), []) for p in PROMPTS]
    hidden = moe_router.gate_rows("hidden", models[0], groups, num_layers=2, hidden=32)
    assert hidden.shape == (2, 2, 32)
    assert torch.allclose(hidden.norm(dim=-1), torch.ones(2, 2), atol=1e-5)
    rows = moe_router.gate_rows("ridge", models[0], groups, num_layers=2, hidden=32)
    model = load_model(models[0], dtype="float32", device="cpu").model
    tokenizer = AutoTokenizer.from_pretrained(models[0])
    right = total = 0
    for expert, prompts in enumerate(PROMPTS):
        batch = moe_router.tokenize(tokenizer, prompts)
        keep = batch["attention_mask"].bool()
        for layer, x in enumerate(moe_router.mlp_inputs(model, batch)):
            chosen = (x[keep] @ rows[layer].T).argmax(dim=-1)
            right, total = right + int((chosen == expert).sum()), total + chosen.numel()
    assert right / total >= 0.9


def test_condition_number_warning(models, caplog):
    assert moe_router.degenerate_layers(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])) == []
    assert moe_router.degenerate_layers(torch.tensor([[[1.0, 0.0], [1.0, 0.01]]])) == [0]
    # The same last token: layer 0 reads its embedding alone, so both experts get one row there.
    close = [(["the cat sat on the mat"], []), (["my cat sat on the mat"], [])]
    rows = moe_router.gate_rows("hidden", models[0], close, num_layers=2, hidden=32)
    with caplog.at_level(logging.WARNING, logger="lmforge.moe"):
        assert 0 in moe_router.warn_degenerate(rows)
    assert "too similar" in caplog.text


def test_ridge_rows_are_not_judged_by_condition_number(models, tmp_path, caplog):
    """Fitted ridge rows separate the prompts (the test above) whatever their conditioning: no 'too similar' warning,
    which the demo's experts got on every layer while ridge routed 91% of extraction's tokens right."""
    with caplog.at_level(logging.WARNING, logger="lmforge.moe"):
        out = moe(moe_config(models, "ridge"), tmp_path / "ridge")
    tensors = load_file(out / "model.safetensors")
    rows = torch.stack([tensors[f"model.layers.{i}.mlp.gate.weight"] for i in range(2)])
    assert moe_router.degenerate_layers(rows)  # ill-conditioned by mergekit's measure ...
    assert json.loads((out / "run.json").read_text())["router"]["degenerate_layers"] == []  # ... and not flagged
    assert "too similar" not in caplog.text


def test_routing_accuracy_is_recorded(models, tmp_path):
    out = moe(moe_config(models, "random", routing_tasks=["dates", "extraction"], routing_limit=4), tmp_path / "r")
    routing = json.loads((out / "run.json").read_text())["metrics"]["moe"]["routing_accuracy"]
    assert set(routing["by_task"]) == {"dates", "extraction"}
    for i, task in enumerate(["dates", "extraction"]):
        assert abs(sum(routing["shares"][task]) - 1) < 1e-3
        assert routing["by_task"][task] == routing["shares"][task][i]
    # The comparison report shows active next to total parameters, and the routing accuracy.
    from lmforge.report.compare import footprint_table, load_rows, method_details

    rows = load_rows([str(out), str(out)])  # the second copy stands in for a baseline row
    record = json.loads((out / "run.json").read_text())
    active = record["metrics"]["moe"]["params_active"] / 1e3
    assert f"({active:.1f} K active)" in footprint_table(rows).rows[0][1]
    _, details = method_details(rows, rows[1], ["dates", "extraction"])
    assert f"routing accuracy dates {routing['by_task']['dates']:.0%}" in details[0][5]


# ---------------------------------------------------------------- bad inputs: one line, nothing written


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda c, tmp: c["experts"][1].update(source_model=str(make_tiny_qwen2(tmp / "qwen2", layers=2))),
            "'qwen2' model",
        ),
        (
            lambda c, tmp: c["experts"][1].update(
                source_model=str(
                    perturbed(make_tiny_llama(tmp / "b48", intermediate=48), tmp / "w48", 3, intermediate=48)
                )
            ),
            "model.layers.0.mlp.gate_proj.weight has shape [48, 32]",
        ),
        (lambda c, tmp: c["experts"][0].pop("positive_prompts"), "experts[0]"),
        (lambda c, tmp: c.update(experts_per_token=3), "experts_per_token 3"),
        (lambda c, tmp: c.update(gate_mode="hiden"), "gate_mode 'hiden'"),
        (lambda c, tmp: c.update(shared_experts=[{"source_model": c["base_model"]}], architecture="mixtral"), "shared"),
    ],
    ids=[
        "other_architecture",
        "other_shape",
        "no_prompts",
        "too_many_per_token",
        "unknown_gate_mode",
        "mixtral_shared",
    ],
)
def test_bad_inputs_one_line_nothing_written(models, tmp_path, monkeypatch, capsys, change, message):
    from cli_helpers import run_cli

    config = moe_config(models)
    change(config, tmp_path)
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(")) as err:
        moe(path, tmp_path / "out")
    assert "\n" not in str(err.value)
    code, _, stderr = run_cli(monkeypatch, capsys, "moe", str(path), str(tmp_path / "out"))
    assert code != 0 and "Traceback" not in stderr and message.split(" has ")[0] in stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_recipe_checks_a_moe_step_before_running(models, tmp_path):
    from lmforge.recipe.kinds import KINDS

    config = moe_config(models) | {"experts_per_token": 5}
    with pytest.raises(UserError, match="step moe: experts_per_token 5"):
        KINDS["moe"].check(config, "step moe")
    assert KINDS["moe"].models(moe_config(models)) == [str(m) for m in models]
