"""Student construction: layer rules, the measured rule, weight copying, narrower MLPs, vocabulary checks."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from lmforge.data.prepare import DataSettings, tokenize
from lmforge.distill import prune
from lmforge.distill import student as students
from lmforge.distill.signals import batch_collate
from lmforge.errors import UserError
from lmforge.models.load import load_model
from lmforge.models.tiny import make_tiny_llama


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return load_model(make_tiny_llama(tmp_path_factory.mktemp("teacher6"), layers=6, seed=2), device="cpu")


@pytest.fixture(scope="module")
def batch(teacher):
    records = [{"prompt": f"Copy the word {w}.", "completion": w} for w in ("the", "ant", "stone", "water")]
    rows = tokenize(records, teacher.tokenizer, DataSettings(max_length=64))
    return batch_collate(teacher.tokenizer.pad_token_id)(rows)


def test_named_rules():
    assert students.stride_layers(30, 15) == [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29]
    assert students.stride_layers(6, 3) == [0, 2, 5] and students.stride_layers(6, 1) == [5]
    assert students.first_last_layers(30, 14) == list(range(7)) + list(range(23, 30))
    assert students.first_last_layers(6, 3) == [0, 1, 5]


def test_measured_rule_beats_or_equals_the_named_rules(teacher, batch):
    vocab = students.shared_vocab(teacher.model, teacher.model)
    layers, scores = students.measured_layers(teacher.model, batch, 3, vocab)
    assert layers == scores[0]["layers"] and len(layers) == 3
    assert [s["kl"] for s in scores] == sorted(s["kl"] for s in scores)
    by_layers = {tuple(s["layers"]): s["kl"] for s in scores}
    for rule in students.LAYER_RULES.values():
        assert scores[0]["kl"] <= by_layers[tuple(rule(6, 3))]
    assert len(students.decoder_layers(teacher.model)) == 6  # the teacher got its layers back


def test_built_student_equals_the_teacher_with_those_layers(teacher, batch):
    layers = [0, 2, 5]
    config = students.student_config(teacher.model, layers, None)
    model = students.random_student(config, seed=0)
    students.copy_teacher_weights(model, teacher.model, layers, None)
    assert [layer.self_attn.layer_idx for layer in students.decoder_layers(model)] == [0, 1, 2]
    original = students.decoder_layers(teacher.model)
    decoder = teacher.model.get_decoder()
    decoder.layers = torch.nn.ModuleList([original[i] for i in layers])
    try:
        with torch.no_grad():
            want = teacher.model(input_ids=batch["input_ids"]).logits
    finally:
        decoder.layers = original
    with torch.no_grad():
        got = model(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(
        model.model.layers[1].mlp.up_proj.weight, teacher.model.model.layers[2].mlp.up_proj.weight
    )


def test_narrower_mlp_keeps_the_most_important_channels(teacher, batch):
    importance = students.mlp_importance(teacher.model, batch)
    assert len(importance) == 6 and importance[0].shape == (64,)
    config = students.student_config(teacher.model, [0, 5], 24)
    model = students.random_student(config, seed=0)
    students.copy_teacher_weights(model, teacher.model, [0, 5], importance)
    keep = importance[5].topk(24).indices.sort().values
    torch.testing.assert_close(
        model.model.layers[1].mlp.gate_proj.weight, teacher.model.model.layers[5].mlp.gate_proj.weight[keep]
    )
    torch.testing.assert_close(
        model.model.layers[1].mlp.down_proj.weight, teacher.model.model.layers[5].mlp.down_proj.weight[:, keep]
    )
    with pytest.raises(UserError, match="student_intermediate"):
        students.student_config(teacher.model, [0], 1000)


def test_init_quality_of_the_teacher_is_zero_kl(teacher, batch):
    vocab = students.shared_vocab(teacher.model, teacher.model)
    own = students.quality(teacher.model, teacher.model, batch, vocab)
    assert abs(own["kl"]) < 1e-5 and own["ce"] > 0
    random_init = students.random_student(students.student_config(teacher.model, [0, 1], None), seed=0)
    assert students.quality(random_init, teacher.model, batch, vocab)["kl"] > 0.01


def test_vocabularies_that_differ_name_the_first_differing_token(teacher, tmp_path, swapped_vocabulary_llama):
    other = swapped_vocabulary_llama
    changed = load_model(other).tokenizer
    with pytest.raises(UserError, match=r"differ at token id \d+ \(teacher 'a', student 'b'\)") as err:
        students.check_vocabularies(teacher.tokenizer, changed)
    assert "\n" not in str(err.value)
    students.check_vocabularies(teacher.tokenizer, load_model(make_tiny_llama(tmp_path / "same", seed=4)).tokenizer)


def test_padded_heads_are_sliced_to_the_shared_rows(teacher):
    model = students.random_student(students.student_config(teacher.model, [0], None), seed=0)
    model.resize_token_embeddings(model.config.vocab_size + 8)
    assert students.shared_vocab(teacher.model, model) == teacher.model.config.vocab_size


def test_differing_chat_templates_warn(teacher, tmp_path, caplog):
    other = load_model(make_tiny_llama(tmp_path / "templ", seed=6)).tokenizer
    other.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with caplog.at_level(logging.WARNING, logger="lmforge.distill"):
        students.check_vocabularies(teacher.tokenizer, other)
    assert "chat templates differ" in caplog.text


def test_a_student_built_from_a_bf16_teacher_trains_in_float32(teacher):
    """On a GPU the teacher is loaded in bf16 and its config says so; the student's weights must not be."""
    config = students.student_config(teacher.model, [0, 5], None)
    config.dtype = torch.bfloat16
    model = students.random_student(config, seed=0)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_depth_then_width_keeps_the_units_the_depth_picked_model_scores_highest(teacher, batch):
    layers = [0, 5]
    model = students.random_student(students.student_config(teacher.model, layers, None), seed=0)
    students.copy_teacher_weights(model, teacher.model, layers, None)
    width = prune.WidthSettings(hidden_size=24, intermediate_size=40, num_attention_heads=2)
    shape = students.width_shape(teacher.model, len(layers), width)
    assert shape == prune.Shape(24, 40, 2)
    pruned = students.width_pruned(model, [batch], shape)
    config = pruned.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (2, 24, 40)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 2, 8)
    scores = prune.importance(model, [batch])  # scored on the depth-picked model, not the six-layer teacher
    top = scores["layers.1.mlp"].topk(40).indices.sort().values
    torch.testing.assert_close(
        pruned.model.layers[1].mlp.up_proj.weight,
        teacher.model.model.layers[5].mlp.up_proj.weight[top][:, scores["hidden"].topk(24).indices.sort().values],
    )


def test_width_pruning_refuses_a_non_llama_teacher():
    config = MistralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    with pytest.raises(UserError, match="width pruning supports llama models, got model_type 'mistral'") as err:
        students.width_shape(MistralForCausalLM(config), 1, prune.WidthSettings(hidden_size=8))
    assert "\n" not in str(err.value)
