"""`lmforge merge` end to end on tiny llamas: output folder, loading and generating, slices and gradients,
block expansion, sharding and chunking, tokenizers, adapters, weight search, evaluation, the CLI (greedy soup:
test_soup.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from merge_helpers import edit_config, edit_weights, family, leftovers, weights
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import lmforge
from lmforge.cli import app
from lmforge.merge import config as merge_config
from lmforge.merge import engine, plan, search, sparsify
from lmforge.merge.run import merge
from lmforge.models.tiny import make_tiny_llama


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return family(tmp_path_factory.mktemp("merge_family"), count=3)


def _ties(models, **extra) -> dict:
    base, a, b = (str(m) for m in models)
    return {
        "merge_method": "ties",
        "base_model": base,
        "models": [
            {"model": a, "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": b, "parameters": {"weight": 0.4, "density": 0.7}},
        ],
    } | extra


def test_ties_output_folder_loads_and_generates(models, tmp_path):
    out = lmforge.merge(_ties(models), tmp_path / "out", progress=False)
    names = {p.name for p in out.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "generation_config.json",
        "lmforge.yaml",
        "run.json",
        "README.md",
    } <= names
    record = json.loads((out / "run.json").read_text())
    assert record["command"] == "merge" and record["method"] == "ties"
    assert [m["ref"] for m in record["inputs"]["models"]] == [str(m) for m in models]
    assert record["params_total"] == sum(t.numel() for t in weights(out).values())
    assert "ties" in (out / "README.md").read_text() and leftovers(tmp_path) == []
    model = AutoModelForCausalLM.from_pretrained(out)
    tokens = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert tokens.shape == (1, 7)
    rerun = merge(str(out / "lmforge.yaml"), tmp_path / "again", progress=False)  # lmforge.yaml reruns as is
    assert all(torch.equal(weights(out)[k], v) for k, v in weights(rerun).items())


def test_streaming_equals_in_memory_for_sharded_and_row_chunked_output(models, tmp_path, monkeypatch):
    config = {
        "merge_method": "linear",
        "models": [
            {"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, (1.0, 2.0, 3.0), strict=True)
        ],
    }
    monkeypatch.setattr(engine, "CHUNK_BYTES", 1024)  # the embeddings stream in many row chunks
    out = merge(config, tmp_path / "out", out_shard_size=20_000, progress=False)
    assert len(list(out.glob("*.safetensors"))) > 2 and (out / "model.safetensors.index.json").is_file()
    inputs = [weights(m) for m in models]
    for name, tensor in weights(out).items():
        want = (inputs[0][name] + 2 * inputs[1][name] + 3 * inputs[2][name]) / 6
        torch.testing.assert_close(tensor, want, rtol=1e-6, atol=1e-7)
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()  # transformers reads the shards and index
    assert all(torch.equal(loaded[name], tensor) for name, tensor in weights(out).items())


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_two_pass_row_chunks_equal_whole_tensors(models, tmp_path, monkeypatch, method):
    config = _ties(models, merge_method=method)
    whole = weights(merge(config, tmp_path / "whole", progress=False))
    monkeypatch.setattr(engine, "CHUNK_BYTES", 512)  # cuts first, then many row chunks per tensor
    monkeypatch.setattr(engine, "WHOLE_BYTES", 1024)
    items = engine.work_items(plan.build(merge_config.read(config), _opened(config)).tensors, _method(method), None)
    assert any(i.cut_of is not None for i in items) and any(i.rows for i in items)
    chunked = weights(merge(config, tmp_path / "chunked", progress=False))
    assert whole.keys() == chunked.keys() and all(torch.equal(whole[k], chunked[k]) for k in whole)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_two_pass_random_draws_equal_whole_tensors(models, tmp_path, monkeypatch, method):
    # the masks are the same bits whether drawn on the whole tensor or streamed chunk by chunk; only the L1
    # rescale factor differs in rounding (summed chunk by chunk in float64 instead of in one float32 sum)
    config = _ties(models, merge_method=method)
    whole = weights(merge(config, tmp_path / "whole", progress=False, seed=3))
    monkeypatch.setattr(engine, "CHUNK_BYTES", 600)  # draws first, then many row chunks per tensor
    monkeypatch.setattr(engine, "WHOLE_BYTES", 1024)
    monkeypatch.setattr(sparsify, "BLOCK", 37)  # and blocks that do not divide the chunks
    items = engine.work_items(plan.build(merge_config.read(config), _opened(config)).tensors, _method(method), None)
    assert any(i.cut_of is not None for i in items) and any(i.rows for i in items)
    chunked = weights(merge(config, tmp_path / "chunked", progress=False, seed=3, num_threads=2))
    assert whole.keys() == chunked.keys()
    for name in whole:  # a different mask would differ by whole task-vector entries
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-6, atol=1e-7)


def _opened(config: dict) -> list[plan.InputModel]:
    return [plan.open_model(ref, Path(ref)) for ref in merge_config.read(config).referenced()]


def _method(name: str):
    from lmforge.merge.methods import METHODS

    return METHODS[name]


def test_bfloat16_output_is_the_float32_result_rounded_once(models, tmp_path):
    full = weights(merge(_ties(models), tmp_path / "f32", progress=False))
    half = weights(merge(_ties(models, out_dtype="bfloat16"), tmp_path / "bf16", progress=False))
    for name, tensor in half.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, full[name].to(torch.bfloat16))
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_passthrough_slices_stack_layers_and_scale_filters(models, tmp_path):
    a, b = str(models[1]), str(models[2])
    config = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": a, "layer_range": [0, 2]}]},
            {
                "sources": [
                    {
                        "model": b,
                        "layer_range": [1, 2],
                        "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1}]},
                    }
                ]
            },
        ],
    }
    out = merge(config, tmp_path / "stack", progress=False)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    got, wb = weights(out), weights(models[2])
    torch.testing.assert_close(
        got["model.layers.2.self_attn.o_proj.weight"], 0.5 * wb["model.layers.1.self_attn.o_proj.weight"]
    )
    torch.testing.assert_close(got["model.layers.2.mlp.up_proj.weight"], wb["model.layers.1.mlp.up_proj.weight"])
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 3


def test_gradients_interpolate_over_layers_and_outer_tensors_take_the_first_value(models, tmp_path):
    base, a = str(models[0]), str(models[1])
    config = {
        "merge_method": "slerp",
        "base_model": base,
        "models": [{"model": base}, {"model": a}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0.2, 0.8]}, {"value": 0.5}]},
    }
    cfg = merge_config.read(config)
    built = plan.build(cfg, [plan.open_model(ref, Path(ref)) for ref in cfg.referenced()])
    t = {p.name: p.shared["t"] for p in built.tensors}
    assert t["model.layers.0.self_attn.q_proj.weight"] == pytest.approx(0.2)
    assert t["model.layers.1.self_attn.q_proj.weight"] == pytest.approx(0.8)
    assert t["model.layers.1.mlp.up_proj.weight"] == 0.5 and t["model.embed_tokens.weight"] == 0.5


def test_block_expansion_computes_exactly_what_the_original_did(models, tmp_path):
    config = {"merge_method": "block_expansion", "models": [{"model": str(models[1])}], "parameters": {"num_new": 2}}
    out = merge(config, tmp_path / "pro", progress=False)
    original, expanded = AutoModelForCausalLM.from_pretrained(models[1]), AutoModelForCausalLM.from_pretrained(out)
    assert expanded.config.num_hidden_layers == 4
    tokens = torch.tensor([[3, 9, 27, 81, 5, 1]])
    with torch.no_grad():
        assert torch.equal(original(tokens).logits, expanded(tokens).logits)
    assert yaml.safe_load((out / "lmforge.yaml").read_text())["merge_method"] == "passthrough"


def test_random_methods_do_not_depend_on_order_or_threads(models, tmp_path, monkeypatch):
    config = _ties(models, merge_method="dare_ties")
    first = weights(merge(config, tmp_path / "a", progress=False, seed=7))
    items = engine.work_items
    monkeypatch.setattr(engine, "work_items", lambda *a: list(reversed(items(*a))))
    second = weights(merge(config, tmp_path / "b", progress=False, seed=7, num_threads=2))
    assert all(torch.equal(first[k], second[k]) for k in first)
    third = weights(merge(config, tmp_path / "c", progress=False, seed=8))
    assert not all(torch.equal(first[k], third[k]) for k in first)


def test_tokenizer_union_remaps_embedding_rows(models, tmp_path):
    from transformers import AutoTokenizer

    grown = tmp_path / "grown"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(models[1]), AutoTokenizer.from_pretrained(models[1])
    tokenizer.add_tokens(["<extra_token>"])
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(grown)
    tokenizer.save_pretrained(grown)
    config = {
        "merge_method": "linear",
        "tokenizer_source": "union",
        "models": [
            {"model": str(models[0]), "parameters": {"weight": 1.0}},
            {"model": str(grown), "parameters": {"weight": 1.0}},
        ],
    }
    out = merge(config, tmp_path / "union", progress=False)
    merged, base, extra = weights(out), weights(models[0]), weights(grown)
    size = len(AutoTokenizer.from_pretrained(out))
    assert size == len(tokenizer) and json.loads((out / "config.json").read_text())["vocab_size"] == size
    embed = merged["model.embed_tokens.weight"]
    torch.testing.assert_close(
        embed[:-1], (base["model.embed_tokens.weight"] + extra["model.embed_tokens.weight"][:-1]) / 2
    )
    torch.testing.assert_close(embed[-1], extra["model.embed_tokens.weight"][-1])  # only one model has it


def test_model_plus_adapter_reference_merges_the_adapter(models, tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(models[0]),
        LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    ref = f"{models[0]}+{tmp_path / 'adapter'}"
    out = merge({"merge_method": "passthrough", "models": [{"model": ref}]}, tmp_path / "merged", progress=False)
    want = peft_model.merge_and_unload().state_dict()
    got = weights(out)
    torch.testing.assert_close(
        got["model.layers.0.self_attn.q_proj.weight"], want["model.layers.0.self_attn.q_proj.weight"]
    )
    assert not torch.equal(
        got["model.layers.0.self_attn.q_proj.weight"], weights(models[0])["model.layers.0.self_attn.q_proj.weight"]
    )


def test_weight_search_picks_the_weights_whose_weakest_task_is_best(models, tmp_path, monkeypatch):
    base, a, b = (str(m) for m in models)
    seen = []

    def fake_score(loaded, task, limit, metric):
        """The first combination is strong on x and weak on y; every later one is balanced."""
        seen.append(loaded.model.model.norm.weight.detach().cpu().clone())
        return {"x": 0.9, "y": 0.5}[task] if len(seen) <= 2 else {"x": 0.8, "y": 0.7}[task], "exact_match"

    monkeypatch.setattr(search, "score_task", fake_score)
    config = {
        "merge_method": "weight_search",
        "base_model": base,
        "models": [a, b],
        "parameters": {"task": ["x", "y"], "weights": [1.0, 0.5]},
    }
    out = merge(config, tmp_path / "searched", progress=False)
    record = json.loads((out / "run.json").read_text())
    assert [r["weights"] for r in record["search"]] == [[1.0, 1.0], [1.0, 0.5], [0.5, 1.0], [0.5, 0.5]]
    assert [r["value"] for r in record["search"]] == [0.5, 0.7, 0.7, 0.7]  # min over tasks; the tie goes first
    assert [r["chosen"] for r in record["search"]] == [False, True, False, False]
    executed = yaml.safe_load((out / "lmforge.yaml").read_text())
    assert executed["merge_method"] == "task_arithmetic"
    assert [m["parameters"]["weight"] for m in executed["models"]] == [1.0, 0.5]
    name = "model.norm.weight"
    w0, wa, wb = (weights(m)[name] for m in models)
    torch.testing.assert_close(weights(out)[name], w0 + (wa - w0) + 0.5 * (wb - w0))
    # each combination was loaded before it was scored: the second trial saw base + a + 0.5 b
    torch.testing.assert_close(seen[2], w0 + (wa - w0) + 0.5 * (wb - w0))
    assert "Weight search" in (out / "README.md").read_text()


def test_weight_search_refuses_a_grid_too_large_to_score(models, tmp_path):
    base, *others = (str(m) for m in models)
    config = {
        "merge_method": "weight_search",
        "base_model": base,
        "models": others,
        "parameters": {"task": "dates", "weights": [round(0.1 * i, 1) for i in range(1, 10)]},
    }
    with pytest.raises(lmforge.UserError, match="81 combinations"):
        merge(config, tmp_path / "too_many", progress=False)
    assert not (tmp_path / "too_many").exists()


@pytest.mark.parametrize(
    ("parameters", "fragment"),
    [
        ({"weights": [0.5, 1.0]}, "needs parameters.task"),
        ({"task": "dates", "rule": "max"}, "parameters.rule must be min"),
    ],
)
def test_weight_search_bad_parameters_are_one_line_errors(models, tmp_path, parameters, fragment):
    base, *others = (str(m) for m in models)
    config = {"merge_method": "weight_search", "base_model": base, "models": others, "parameters": parameters}
    with pytest.raises(lmforge.UserError, match=fragment) as caught:
        merge(config, tmp_path / "bad", progress=False)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "bad").exists()


def test_eval_scores_inputs_and_output(models, tmp_path):
    task = tmp_path / "texts.jsonl"
    task.write_text("\n".join(json.dumps({"text": f"the cat sat on the mat {i}"}) for i in range(3)))
    out = merge(_ties(models), tmp_path / "scored", eval_tasks=[str(task)], eval_limit=3, progress=False)
    record = json.loads((out / "run.json").read_text())
    assert record["metrics"][str(task)]["perplexity"]["value"] > 1
    assert set(record["input_metrics"]) == {str(m) for m in models}
    assert f"| {task} | perplexity |" in (out / "README.md").read_text()


def test_explain_prints_parameters_and_writes_nothing(models, tmp_path, capsys):
    out = merge(_ties(models), tmp_path / "never", explain=True)
    shown = capsys.readouterr().out
    assert "density=0.7" in shown and "normalize=True" in shown and not out.exists()


def test_cli_flag_form_and_mergekit_flags(models, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(
        app,
        [
            "merge",
            "--method",
            "ties",
            "--base",
            str(models[0]),
            str(models[1]),
            str(models[2]),
            "--density",
            "0.5",
            "--weight",
            "0.5",
            str(out),
            "--lazy-unpickle",
            "--allow-crimes",
            "--quiet",
            "-v",
            "--out-shard-size",
            "1B",
        ],
    )
    assert result.exit_code == 0, result.output
    written = yaml.safe_load((out / "lmforge.yaml").read_text())
    assert written["models"][0]["parameters"] == {"weight": 0.5, "density": 0.5} and written["base_model"] == str(
        models[0]
    )
    yaml_file = tmp_path / "cfg.yaml"
    yaml_file.write_text(yaml.safe_dump(_ties(models)))
    result = CliRunner().invoke(app, ["merge", str(yaml_file), str(tmp_path / "cli2"), "--quiet", "--random-seed", "3"])
    assert result.exit_code == 0, result.output


def test_a_failure_midway_leaves_no_output(models, tmp_path, monkeypatch):
    calls = []

    def fail_later(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return compute(*args)

    compute = engine._compute
    monkeypatch.setattr(engine, "_compute", fail_later)
    with pytest.raises(KeyboardInterrupt):
        merge(_ties(models), tmp_path / "half", progress=False)
    assert not (tmp_path / "half").exists() and leftovers(tmp_path) == []


def test_example_config_reads():
    cfg = merge_config.read(Path(__file__).resolve().parent.parent / "configs" / "merge_ties.yaml")
    assert cfg.merge_method == "ties" and cfg.base_model == "default" and len(cfg.models) == 2


def test_tied_checkpoints_merge_whichever_name_holds_the_embedding(tmp_path):
    tied = make_tiny_llama(tmp_path / "tied", tie_embeddings=True)
    head_only = shutil.copytree(tied, tmp_path / "head_only")  # as safetensors' save_model (GGUF cache) writes it
    rename = {"model.embed_tokens.weight": "lm_head.weight"}
    edit_weights(head_only, lambda w: {rename.get(k, k): v for k, v in w.items()})
    edit_config(head_only, architectures=None)  # GGUF conversions write no architectures
    models = [{"model": str(m), "parameters": {"weight": 1.0}} for m in (tied, head_only)]
    got = weights(merge({"merge_method": "linear", "models": models}, tmp_path / "out", progress=False))
    assert "lm_head.weight" not in got
    torch.testing.assert_close(got["model.embed_tokens.weight"], weights(tied)["model.embed_tokens.weight"])


def test_conversions_in_the_buffer_equal_torchs(tmp_path):
    """read_rows widens bf16 in its own buffer and narrow_in_place rounds in place, block by block across
    several blocks: the same bits as `.to(dtype)`."""
    from safetensors.torch import save_file

    from lmforge.merge.safetensors_io import BLOCK, narrow_in_place, read_header, read_rows

    values = torch.randn(3 * BLOCK + 8, generator=torch.Generator().manual_seed(0)).view(-1, 8) * 1e-3
    stored = values.bfloat16()
    save_file({"w": stored}, tmp_path / "w.safetensors")
    info = read_header(tmp_path / "w.safetensors")["w"]
    assert torch.equal(read_rows(info, None, torch.float32), stored.float())
    assert torch.equal(read_rows(info, (7, 70), torch.float32), stored[7:70].float())
    assert torch.equal(narrow_in_place(values.clone(), torch.bfloat16), stored)
