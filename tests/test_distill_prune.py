"""Width pruning (Minitron): pruned models equal the original with the pruned units zeroed, importance finds
units zeroed by hand, target shapes and parameter fractions, bad inputs, and an end-to-end distill run.

"Exact" for hidden channels: RMSNorm divides by the mean square over the channels it sees, so dropping zeroed
channels changes that mean by d / d'. `prune` scales every norm weight by sqrt(d / d') and rms_norm_eps by
d / d', which makes the pruned model equal to the zeroed original (eps included); without that scaling it
does not (tested below), so the equality is a property of the scaling, not of the zeros.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lmforge import cli
from lmforge import config as config_io
from lmforge.data.prepare import DataSettings, tokenize
from lmforge.distill import prune
from lmforge.distill import run as distill_run
from lmforge.distill.run import DistillConfig, run_distill
from lmforge.distill.signals import batch_collate
from lmforge.errors import UserError
from lmforge.models.load import load_model
from lmforge.models.tiny import make_tiny_llama

# (tied head, query heads, key-value heads): untied and tied, grouped-query (2 and 4 per group) and multi-head
VARIANTS = [(False, 4, 2), (True, 4, 2), (False, 8, 2), (True, 4, 4)]


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: f"tied{v[0]}-h{v[1]}-kv{v[2]}")
def loaded(request, tmp_path_factory):
    tied, heads, kv = request.param
    folder = make_tiny_llama(
        tmp_path_factory.mktemp("prune"), layers=2, heads=heads, kv_heads=kv, tie_embeddings=tied, seed=3
    )
    return load_model(folder, device="cpu")


def calibration(loaded) -> dict:
    records = [{"prompt": f"Say {w} twice.", "completion": f"{w} {w}"} for w in ("red", "stone", "a", "river")]
    return batch_collate(loaded.tokenizer.pad_token_id)(tokenize(records, loaded.tokenizer, DataSettings()))


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def dropped(kept: torch.Tensor, total: int) -> torch.Tensor:
    mask = torch.ones(total, dtype=torch.bool)
    mask[kept] = False
    return mask


def test_pruned_heads_and_channels_equal_the_zeroed_original(loaded):
    model, batch = loaded.model, calibration(loaded)
    config = model.config
    kv = config.num_key_value_heads
    shape = prune.Shape(config.hidden_size, 40, kv)  # one query head per group, 40 of 64 MLP channels
    keep = prune.choose(prune.importance(model, [batch]), config, shape)
    pruned = prune.prune(model, keep)
    assert (pruned.config.num_attention_heads, pruned.config.intermediate_size) == (kv, 40)
    assert pruned.config.head_dim == config.hidden_size // config.num_attention_heads
    zeroed = copy.deepcopy(model)
    head_dim = pruned.config.head_dim
    with torch.no_grad():
        for i, layer in enumerate(zeroed.model.layers):
            gone_heads = dropped(keep[f"layers.{i}.heads"], config.num_attention_heads)
            columns = gone_heads.repeat_interleave(head_dim)
            layer.self_attn.o_proj.weight[:, columns] = 0
            layer.mlp.down_proj.weight[:, dropped(keep[f"layers.{i}.mlp"], config.intermediate_size)] = 0
    torch.testing.assert_close(logits(pruned, batch), logits(zeroed, batch))
    assert not torch.allclose(logits(pruned, batch), logits(model, batch), atol=1e-3)  # the zeros mattered
    per_group = config.num_attention_heads // kv
    for i in range(config.num_hidden_layers):
        assert torch.bincount(keep[f"layers.{i}.heads"] // per_group, minlength=kv).tolist() == [1] * kv


def test_pruned_hidden_channels_equal_the_zeroed_original(loaded):
    model, batch = loaded.model, calibration(loaded)
    config = model.config
    shape = prune.Shape(24, config.intermediate_size, config.num_attention_heads)
    keep = prune.choose(prune.importance(model, [batch]), config, shape)
    pruned = prune.prune(model, keep)
    assert pruned.config.hidden_size == 24 and pruned.model.embed_tokens.weight.shape[1] == 24
    assert (pruned.lm_head.weight is pruned.model.embed_tokens.weight) == config.tie_word_embeddings
    gone = dropped(keep["hidden"], config.hidden_size)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():  # nothing writes the dropped channels of the residual stream, so they stay 0
        zeroed.model.embed_tokens.weight[:, gone] = 0
        for layer in zeroed.model.layers:
            layer.self_attn.o_proj.weight[gone] = 0
            layer.mlp.down_proj.weight[gone] = 0
    torch.testing.assert_close(logits(pruned, batch), logits(zeroed, batch))

    # Without the RMSNorm scaling the pruned model normalises by a different mean square: not equal.
    unscaled = copy.deepcopy(pruned)
    with torch.no_grad():
        for name, param in unscaled.named_parameters():
            if name.endswith("norm.weight"):
                param /= math.sqrt(config.hidden_size / 24)
    for module in unscaled.modules():
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = config.rms_norm_eps
    assert not torch.allclose(logits(unscaled, batch), logits(zeroed, batch), atol=1e-3)


def test_all_three_at_once_round_trip_through_save_and_load(loaded, tmp_path):
    model, batch = loaded.model, calibration(loaded)
    kv = model.config.num_key_value_heads
    shape = prune.Shape(16, 24, kv)
    pruned = prune.prune(model, prune.choose(prune.importance(model, [batch]), model.config, shape))
    assert sum(p.numel() for p in pruned.parameters()) == prune.param_count(pruned.config)
    assert sum(p.numel() for p in model.parameters()) == prune.param_count(model.config)
    pruned.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(again, batch), logits(pruned, batch))


def test_importance_ranks_units_zeroed_by_hand_lowest(loaded):
    model, batch = copy.deepcopy(loaded.model), calibration(loaded)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    per_group = config.num_attention_heads // config.num_key_value_heads
    with torch.no_grad():
        layer = model.model.layers[1]
        layer.self_attn.v_proj.weight[head_dim : 2 * head_dim] = 0  # key-value head 1: its query heads output 0
        layer.mlp.gate_proj.weight[7] = 0  # silu(0) = 0: channel 7 reaches down_proj as 0
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param[5] = 0  # every norm outputs 0 in hidden channel 5
    scores = prune.importance(model, [batch])
    heads = scores["layers.1.heads"]
    zeroed_heads = list(range(per_group, 2 * per_group))
    assert heads[zeroed_heads].max() == 0 and heads.sort().indices[:per_group].sort().values.tolist() == zeroed_heads
    assert scores["layers.1.mlp"].argmin() == 7 and scores["layers.1.mlp"][7] == 0
    assert scores["hidden"].argmin() == 5 and scores["hidden"][5] == 0
    assert scores["layers.0.mlp"].min() > 0  # the untouched layer has no zero channel
    keep = prune.choose(scores, config, prune.Shape(config.hidden_size - 1, config.intermediate_size - 1, 4))
    assert 5 not in keep["hidden"].tolist() and 7 not in keep["layers.1.mlp"].tolist()


def test_fraction_rule_narrows_the_mlp_first_then_the_hidden_size(loaded):
    config = loaded.model.config  # hidden 32, intermediate 64
    total = prune.param_count(config)
    mild = prune.target_shape(config, 2, prune.WidthSettings(params_fraction=0.9), total)
    assert mild.hidden_size == 32 and 32 <= mild.intermediate_size < 64
    strong = prune.target_shape(config, 2, prune.WidthSettings(params_fraction=0.5), total)
    assert strong.hidden_size < 32 and 32 <= strong.intermediate_size <= 64
    for shape, fraction in ((mild, 0.9), (strong, 0.5)):
        trial = copy.copy(config)
        trial.hidden_size, trial.intermediate_size = shape.hidden_size, shape.intermediate_size
        trial.head_dim = config.hidden_size // config.num_attention_heads
        assert prune.param_count(trial) <= fraction * total
        # one step wider no longer fits: the MLP was widened as far as the target allows...
        if shape.intermediate_size < 64:
            widened = copy.copy(trial)
            widened.intermediate_size += 8
            assert prune.param_count(widened) > fraction * total
        if shape.hidden_size < config.hidden_size:  # ...and a wider hidden size fails even with the MLP at half
            wider = copy.copy(trial)
            wider.hidden_size, wider.intermediate_size = shape.hidden_size + 8, 32
            assert prune.param_count(wider) > fraction * total
    with pytest.raises(UserError, match="already hold"):
        prune.target_shape(config, 1, prune.WidthSettings(params_fraction=0.95), total)


def test_a_shape_that_breaks_head_grouping_is_one_clear_line():
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=8, num_key_value_heads=2)
    for bad in (3, 5, 1):
        with pytest.raises(UserError, match=r"breaks head grouping.*multiple of 2 \(2, 4, 6, 8\)") as err:
            prune.target_shape(config, 2, prune.WidthSettings(num_attention_heads=bad), 1000)
        assert "\n" not in str(err.value)
    assert prune.target_shape(config, 2, prune.WidthSettings(num_attention_heads=4), 1000).num_attention_heads == 4
    six = prune.WidthSettings(num_attention_heads=6, hidden_size=24)  # 6 heads need a hidden size that 6 divides
    assert prune.target_shape(config, 2, six, 1000).num_attention_heads == 6
    with pytest.raises(UserError, match="more than the teacher's"):
        prune.target_shape(config, 2, prune.WidthSettings(hidden_size=4096), 1000)


def test_uneven_heads_per_group_are_refused(teacher):
    model = load_model(teacher, device="cpu").model  # 4 query heads in 2 groups
    keep = {f"layers.{i}.heads": torch.tensor([0, 1]) for i in range(4)}  # both from group 0
    with pytest.raises(UserError, match=r"keeps \[2, 0\] query heads per key-value group"):
        prune.prune(model, keep)


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.2])
def test_a_fraction_outside_zero_one_is_refused_when_read(fraction, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"width\.params_fraction must be in \(0, 1\)") as err:
        config_io.load(None, DistillConfig, [f"output={out}", f"width.params_fraction={fraction}"])
    assert "\n" not in str(err.value) and not out.exists()


def test_width_goes_with_a_built_student_only():
    with pytest.raises(UserError, match="width"):
        config_io.load(None, DistillConfig, ["output=x", "student=some/model", "width.hidden_size=16"])
    with pytest.raises(UserError, match="shape or a fraction"):
        config_io.load(None, DistillConfig, ["output=x", "width.hidden_size=16", "width.params_fraction=0.5"])


def test_a_hidden_size_that_is_no_multiple_of_the_heads_is_one_clear_line():
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=8, num_key_value_heads=2)
    with pytest.raises(UserError, match=r"width\.hidden_size=20 is not a multiple of the student's 8 attention") as err:
        prune.target_shape(config, 2, prune.WidthSettings(hidden_size=20), 1000)
    assert "\n" not in str(err.value) and "16, 24, 32" in str(err.value)
    assert prune.target_shape(config, 2, prune.WidthSettings(hidden_size=20, num_attention_heads=4), 1000)


@pytest.mark.parametrize("fraction", [0.6, 0.4, 0.2])
def test_the_fraction_rule_keeps_the_hidden_size_a_multiple_of_nine_heads(fraction):
    """SmolLM2-135M's shape (hidden 576, 9 query heads, 3 key-value heads): a hidden size that is no multiple of 9
    builds, trains, and then fails when transformers validates the config on save (the first real size curve)."""
    config = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        num_hidden_layers=30,
        vocab_size=49152,
        tie_word_embeddings=True,
    )
    total = prune.param_count(config)
    shape = prune.target_shape(config, 30, prune.WidthSettings(params_fraction=fraction), total)
    assert shape.hidden_size < 576 and shape.hidden_size % 72 == 0  # heads 9 and steps of 8
    trial = copy.copy(config)
    trial.hidden_size, trial.intermediate_size = shape.hidden_size, shape.intermediate_size
    assert fraction - 0.02 < prune.param_count(trial) / total <= fraction
    trial.validate_architecture()  # what save_pretrained checks


def test_a_nine_head_teacher_pruned_to_a_fraction_saves_and_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(distill_run, "measure_footprint", functools.partial(distill_run.measure_footprint, repeats=1))
    nine = make_tiny_llama(tmp_path / "nine", hidden=144, heads=9, kv_heads=3, intermediate=256, layers=2, seed=0)
    out = run_distill(distill_cfg(nine, tmp_path / "student", "width.params_fraction=0.5"))
    config = AutoModelForCausalLM.from_pretrained(out).config
    assert config.hidden_size < 144 and config.hidden_size % 9 == 0 and config.num_attention_heads == 9


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("teacher"), layers=4, heads=4, kv_heads=2, seed=0)


def distill_cfg(teacher, out, *overrides):
    base = [
        f"teacher={teacher}",
        f"output={out}",
        "data.task=dates",
        "data.limit=24",
        "train.max_steps=2",
        "train.batch_size=8",
        "train.save_every=100",
        "eval.limit=2",
        "eval.batch_size=2",
        "eval.probe=false",
    ]
    return config_io.load(None, DistillConfig, base + list(overrides))


def lmforge(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run `lmforge ARGS` through the CLI entry point; (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["lmforge", *args])
    try:
        cli.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    return code, capsys.readouterr().err


def test_lmforge_distill_with_a_width_pruned_student_writes_a_loadable_folder(
    teacher, tmp_path, monkeypatch, capsys, caplog
):
    monkeypatch.setattr(distill_run, "measure_footprint", functools.partial(distill_run.measure_footprint, repeats=1))
    out = tmp_path / "student"
    base = ["distill", "--teacher", str(teacher), "--task", "dates", "--out", str(out), "--steps", "2"]
    shape = ["width.hidden_size=24", "width.intermediate_size=40", "width.num_attention_heads=2"]
    settings = ["student_layers=3", "data.limit=24", "train.batch_size=8", "eval.limit=2", "eval.probe=false"]
    with caplog.at_level("INFO", logger="lmforge.distill"):
        code, err = lmforge(monkeypatch, capsys, *base, *settings, *shape)
    assert code == 0, err
    assert "width pruning: hidden 32 -> 24, MLP 64 -> 40, query heads 4 -> 2" in caplog.text
    assert "init quality" in caplog.text
    model = AutoModelForCausalLM.from_pretrained(out)
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads) == (3, 24, 40, 2)
    assert c.head_dim == 8 and c.num_key_value_heads == 2
    record = json.loads((out / "run.json").read_text())
    assert record["inputs"]["student"]["width"] == {
        "hidden_size": 24,
        "intermediate_size": 40,
        "num_attention_heads": 2,
    }
    init = record["init_quality"]  # a random tiny teacher has nothing to keep, so only that it was measured
    assert all(math.isfinite(init[who][k]) for who in ("student", "random_init") for k in ("ce", "kl"))

    again = tmp_path / "again"  # a head count that breaks grouping: one line, nothing written
    code, err = lmforge(monkeypatch, capsys, *base[:-4], "--out", str(again), "width.num_attention_heads=3")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "breaks head grouping" in err
    assert not again.exists() and not (tmp_path / "again.work").exists()

    odd = tmp_path / "odd"  # a hidden size the 4 heads do not divide: one line, nothing written
    code, err = lmforge(monkeypatch, capsys, *base[:-4], "--out", str(odd), "width.hidden_size=30")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not a multiple of the student's 4" in err
    assert not odd.exists() and not (tmp_path / "odd.work").exists()


def test_distill_to_a_parameter_fraction(teacher, tmp_path, monkeypatch):
    monkeypatch.setattr(distill_run, "measure_footprint", functools.partial(distill_run.measure_footprint, repeats=1))
    out = run_distill(distill_cfg(teacher, tmp_path / "student", "width.params_fraction=0.6"))
    record = json.loads((out / "run.json").read_text())
    assert record["inputs"]["student"]["from_teacher_layers"] == [0, 1, 2, 3]  # width only: every layer kept
    assert 0.5 < record["ratios"]["params"] <= 0.6
    assert (
        AutoModelForCausalLM.from_pretrained(out).config.hidden_size
        == record["inputs"]["student"]["width"]["hidden_size"]
    )


@pytest.mark.parametrize("width", [{"hidden_size": 24}, {"params_fraction": 0.6}, {"intermediate_size": 40}])
def test_student_intermediate_and_width_are_one_mlp_width(width):
    """student_intermediate narrows the MLP before width pruning reads the teacher's shape: any width with it is
    refused when the config is read (a width.hidden_size beside it used to size the MLP from the teacher)."""
    data = {"output": "unused", "student_layers": 2, "student_intermediate": 32, "width": width}
    with pytest.raises(UserError, match="^config: width cannot go with student_intermediate"):
        config_io.from_dict(data, DistillConfig)


def test_a_student_worse_than_random_gets_advice_for_its_own_cut(teacher, tmp_path):
    """The warning once told a width-pruned student (all layers kept) to change its layer rule."""
    width = distill_cfg(teacher, tmp_path / "a", "width.params_fraction=0.6")
    assert "width.params_fraction" in distill_run._closer_start(width)
    assert "layer_rule" not in distill_run._closer_start(width)
    depth = distill_cfg(teacher, tmp_path / "b", "student_layers=2", "layer_rule=stride")
    assert "layer_rule: measured" in distill_run._closer_start(depth)
