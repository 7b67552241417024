"""General text mixed into distillation (issue 17): the ratio per step, the probe kept out of training, the
general objective and weight, teacher correction, and bad general files."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import run_cli

from lmforge import config as config_io
from lmforge.cache import cache_dir
from lmforge.data.probe import general_text
from lmforge.distill import general
from lmforge.distill import run as distill_run
from lmforge.distill.objectives import Objective
from lmforge.distill.run import DistillConfig, Guards, make_loss_fn, run_distill
from lmforge.distill.signals import batch_collate
from lmforge.errors import UserError
from lmforge.models.load import load_model
from lmforge.models.tiny import make_tiny_llama

ORDINARY = [
    "The old lighthouse keeper climbed the stairs every evening to light the lamp for the fishing boats.",
    "Bread rises because yeast turns sugar into carbon dioxide, which the gluten in the dough traps as bubbles.",
    "The river floods every spring, and the farmers plant rice on the wet fields when the water goes down.",
]


pytestmark = pytest.mark.usefixtures("one_timing_repeat")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("general_teacher"), layers=4, seed=0)


@pytest.fixture
def general_file(tmp_path):
    """Ordinary passages and two of the probe's passages, as a .txt file."""
    path = tmp_path / "general.txt"
    path.write_text("\n\n".join([ORDINARY[0], general_text()[0], ORDINARY[1], general_text()[3], ORDINARY[2]]))
    return path


def make_cfg(teacher, out, *overrides):
    base = [
        f"teacher={teacher}",
        f"output={out}",
        "student_layers=2",
        "data.task=dates",
        "data.limit=24",
        "train.max_steps=3",
        "train.batch_size=4",
        "train.lr=5e-3",
        "train.save_every=100",
        "eval.limit=2",
        "eval.batch_size=2",
        "eval.probe=false",
        "general.samples=6",
        "general.max_new_tokens=16",
        "general.max_length=48",
    ]
    return config_io.load(None, DistillConfig, base + list(overrides))


class Spy:
    """Wraps the real training loop and records, per optimiser step, the batches its collate produced."""

    def __init__(self, monkeypatch):
        self.steps: list[list[dict]] = [[]]
        real = distill_run.train

        def train(model, rows, loss_fn, collate, cfg, work, **kwargs):
            def recording(chunk):
                batch = collate(chunk)
                self.steps[-1].append(batch)
                return batch

            on_log = kwargs.pop("on_log")

            def logged(entry):
                if "loss" in entry:  # a step ended: later batches belong to the next one
                    self.steps.append([])
                on_log(entry)

            return real(model, rows, loss_fn, recording, cfg, work, on_log=logged, **kwargs)

        monkeypatch.setattr(distill_run, "train", train)

    def trained_steps(self) -> list[list[dict]]:
        return [step for step in self.steps if step]


@pytest.mark.parametrize("ratio, per_task", [(1.0, 1), (2.0, 2), (0.5, 0.5)])
def test_the_mix_ratio_holds_in_every_step(teacher, tmp_path, monkeypatch, ratio, per_task):
    spy = Spy(monkeypatch)
    # a small token budget splits each step into several micro-batches: the ratio must hold across them
    run_distill(make_cfg(teacher, tmp_path / "out", f"general.ratio={ratio}", "train.micro_batch_tokens=300"))
    steps = spy.trained_steps()
    assert len(steps) == 3
    for step in steps:
        task = sum(len(batch["input_ids"]) for batch in step)
        mixed = sum(len(batch["general"]["input_ids"]) for batch in step)
        assert task == 4 * max(1, round(1 / per_task))  # batch_size units, each of T task rows
        assert mixed == task * per_task
        for batch in step:
            general_labels = batch["general"]["labels"][batch["general"]["attention_mask"].bool()]
            assert (general_labels != -100).all()  # general text is trained on every token
    assert len(steps[0]) > 1  # the budget did split the steps


def test_no_general_text_without_the_mix(teacher, tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    out = run_distill(make_cfg(teacher, tmp_path / "out", "general.ratio=0"))
    assert all("general" not in batch for step in spy.trained_steps() for batch in step)
    assert json.loads((out / "run.json").read_text())["data"]["general_rows"] == 0


def probe_grams_in(token_ids, tokenizer) -> set:
    return general.ngrams(tokenizer.decode(token_ids, skip_special_tokens=True)) & general.probe_ngrams()


def test_the_probe_never_reaches_training_data(teacher, tmp_path, monkeypatch, general_file):
    assert general.ngrams(general_file.read_text()) & general.probe_ngrams()  # the file does hold probe text
    spy = Spy(monkeypatch)
    out = run_distill(
        make_cfg(
            teacher, tmp_path / "out", f"general.file={general_file}", "general.max_length=256", "train.max_steps=6"
        )
    )
    tokenizer = load_model(str(teacher)).tokenizer
    seen_general = ""
    for step in spy.trained_steps():
        for batch in step:
            for part in (batch, batch["general"]):
                for ids, mask in zip(part["input_ids"], part["attention_mask"], strict=True):
                    assert not probe_grams_in(ids[mask.bool()].tolist(), tokenizer)
            seen_general += tokenizer.decode(batch["general"]["input_ids"].flatten(), skip_special_tokens=True)
    assert "lighthouse keeper" in seen_general and "yeast" in seen_general  # the ordinary text did train
    assert json.loads((out / "run.json").read_text())["data"]["general_source"] == str(general_file)


def test_probe_overlap_is_dropped_and_all_overlap_refused():
    probe = general_text()
    kept = general.without_probe([ORDINARY[0], "Intro. " + probe[2][:400], ORDINARY[1]], "a test")
    assert kept == [ORDINARY[0], ORDINARY[1]]
    with pytest.raises(UserError, match="overlaps the perplexity probe"):
        general.without_probe([probe[5]], "a test")


def test_teacher_samples_are_written_once_and_reused(teacher, tmp_path, monkeypatch):
    loaded = load_model(str(teacher))
    settings = general.GeneralSettings(samples=5, max_new_tokens=12)
    path = tmp_path / "work" / "general_samples.jsonl"
    first = general.teacher_samples(loaded.model, loaded.tokenizer, settings, path, "key-1", seed=0)
    assert len(first) == 5 and all(text.startswith(general.PROMPTS[i]) for i, text in enumerate(first))
    assert any(len(text) > len(general.PROMPTS[i]) for i, text in enumerate(first))  # the teacher wrote text

    def no_generation(*args, **kwargs):
        raise AssertionError("the cached samples were written again")

    monkeypatch.setattr(general.signals, "generate", no_generation)
    assert general.teacher_samples(loaded.model, loaded.tokenizer, settings, path, "key-1", seed=0) == first
    with pytest.raises(AssertionError, match="written again"):  # other inputs (key): new samples
        general.teacher_samples(loaded.model, loaded.tokenizer, settings, path, "key-2", seed=0)


def test_runs_from_one_teacher_share_its_samples(teacher, tmp_path, monkeypatch):
    """A size curve distils several students from one teacher: the teacher writes its general samples once."""
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))  # empty: the first run writes the samples
    first = run_distill(make_cfg(teacher, tmp_path / "a"))
    written = sorted((cache_dir() / "general_samples").glob("*.jsonl"))
    assert len(written) == 1 and len(written[0].read_text().splitlines()) == 1 + 6  # key line + the samples

    def no_generation(*args, **kwargs):
        raise AssertionError("the teacher wrote its samples again")

    monkeypatch.setattr(general.signals, "generate", no_generation)
    second = run_distill(make_cfg(teacher, tmp_path / "b", "student_layers=3"))  # another student, same samples
    for out in (first, second):
        assert json.loads((out / "run.json").read_text())["data"]["general_rows"] > 0
    with pytest.raises(AssertionError, match="again"):  # other sampling settings: the teacher writes anew
        run_distill(make_cfg(teacher, tmp_path / "c", "general.samples=5"))


def naive_sum(student, teacher, batch: dict, divergence: str) -> tuple[float, int]:
    """Summed per-token divergence over the trained positions, from full logits (no chunking, no shortcuts)."""
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    keep = batch["labels"][:, 1:] != -100
    s_log, t_log = s[keep].log_softmax(-1), t[keep].log_softmax(-1)
    if divergence == "forward_kl":
        values = (t_log.exp() * (t_log - s_log)).sum(-1)
    else:  # reverse_kl
        values = (s_log.exp() * (s_log - t_log)).sum(-1)
    return float(values.sum()), int(keep.sum())


def test_the_general_objective_and_weight_make_the_loss(teacher, tmp_path):
    loaded_teacher = load_model(str(teacher))
    student = load_model(str(make_tiny_llama(tmp_path / "student", layers=2, seed=3))).model
    tokenizer = loaded_teacher.tokenizer
    task_rows = [
        {"input_ids": ids, "labels": [-100] * 5 + ids[5:], "position_ids": list(range(len(ids)))}
        for ids in (tokenizer(text)["input_ids"] for text in ["what day follows monday? tuesday", "two plus two: four"])
    ]
    general_rows = general.rows(ORDINARY, tokenizer, max_length=40)
    collate = batch_collate(tokenizer.pad_token_id)
    units = general.units(task_rows, general_rows, 1.0)
    batch = general.mixed_collate(collate, collate)(units)
    vocab = student.config.vocab_size
    weight = 0.3
    loss_fn = general.mixed_loss(
        make_loss_fn(loaded_teacher.model, None, [Objective("forward_kl")], vocab, 16, Guards()),
        make_loss_fn(loaded_teacher.model, None, [Objective("reverse_kl")], vocab, 16, Guards()),
        weight,
        general.token_ratio(units),
    )
    loss, metrics = loss_fn(student, batch)
    loss = loss.detach()
    task_sum, task_tokens = naive_sum(student, loaded_teacher.model, batch, "forward_kl")
    general_sum, general_tokens = naive_sum(student, loaded_teacher.model, batch["general"], "reverse_kl")
    # the loop divides by the task tokens: task mean + weight x general mean (this batch is the whole mix)
    assert metrics["tokens"] == task_tokens
    assert general.token_ratio(units) == task_tokens / general_tokens
    assert float(loss) / task_tokens == pytest.approx(
        task_sum / task_tokens + weight * general_sum / general_tokens, rel=1e-4
    )
    # the general objective really is the one applied: forward KL there gives another value
    forward = general.mixed_loss(
        make_loss_fn(loaded_teacher.model, None, [Objective("forward_kl")], vocab, 16, Guards()),
        make_loss_fn(loaded_teacher.model, None, [Objective("forward_kl")], vocab, 16, Guards()),
        weight,
        general.token_ratio(units),
    )(student, batch)[0].detach()
    assert float(forward) != pytest.approx(float(loss), rel=1e-3)
    # validation batches (no general rows) are scored on the task alone
    plain = {k: v for k, v in batch.items() if k != "general"}
    assert float(loss_fn(student, plain)[0].detach()) == pytest.approx(task_sum, rel=1e-4)


def test_teacher_correction_fits_the_general_text(teacher, tmp_path):
    loaded = load_model(str(teacher))
    rows = general.rows(ORDINARY * 3, loaded.tokenizer, max_length=40)
    batch = batch_collate(loaded.tokenizer.pad_token_id)(rows)

    def lm_loss(model) -> float:
        with torch.no_grad():
            return float(
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
            )

    before = lm_loss(loaded.model)
    settings = general.GeneralSettings(correct_teacher=8, correct_lr=5e-3)
    corrected = general.correct_teacher(loaded.model, rows, settings, loaded.tokenizer.pad_token_id, tmp_path, 0, False)
    assert not any(p.requires_grad for p in corrected.parameters())
    assert "lora" not in " ".join(name for name, _ in corrected.named_parameters())  # merged
    assert lm_loss(corrected) < before - 0.1


def test_a_run_with_teacher_correction_records_it(teacher, tmp_path, general_file):
    out = run_distill(make_cfg(teacher, tmp_path / "out", f"general.file={general_file}", "general.correct_teacher=2"))
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["general"]["correct_teacher"] == 2 and record["data"]["general_rows"] > 0


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("general.csv", "text\nhello there\n", "is a .csv file"),
        ("general.jsonl", '{"content": "hello there"}\n', "is not plain text"),
        ("general.jsonl", "not json at all\n", "is not plain text"),
        ("missing.txt", None, "not found"),
        ("probe.txt", "PROBE", "overlaps the perplexity probe"),
    ],
)
def test_a_bad_general_file_is_one_line_and_writes_nothing(
    teacher, tmp_path, monkeypatch, capsys, name, content, message
):
    path = tmp_path / name
    if content is not None:
        path.write_text(general_text()[1].replace("\n\n", " ") if content == "PROBE" else content)  # one passage
    out = tmp_path / "student"
    code, _, err = run_cli(
        monkeypatch, capsys, "distill", "--teacher", str(teacher), "--task", "dates", "--out", str(out),
        "--student-layers", "2", "--general-file", str(path),
    )  # fmt: skip
    assert code == 2 and err.strip().startswith("lmforge: error: ") and message in err, err
    assert str(path) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "student.work").exists()


@pytest.mark.parametrize(
    "override, message",
    [("general.ratio=-1", "ratio must be >= 0"), ("general.ratio=0.05", "below 1/8"), ("general.weight=-2", "weight")],
)
def test_bad_general_settings_are_refused_when_read(teacher, tmp_path, override, message):
    with pytest.raises(UserError, match=message) as err:
        make_cfg(teacher, tmp_path / "bad", override)
    assert "\n" not in str(err.value)


def test_the_layer_choice_weighs_task_and_general_text_equally(teacher):
    from lmforge.distill import student as students

    loaded = load_model(str(teacher))
    collate = batch_collate(loaded.tokenizer.pad_token_id)
    task = collate(
        [
            {"input_ids": ids, "labels": [-100] * 4 + ids[4:], "position_ids": list(range(len(ids)))}
            for ids in (loaded.tokenizer(t)["input_ids"] for t in ["monday then tuesday", "one two three four"])
        ]
    )
    text = collate(general.rows(ORDINARY, loaded.tokenizer, max_length=40))
    vocab = loaded.model.config.vocab_size
    _, both = students.measured_layers(loaded.model, [task, text], 2, vocab)
    alone = [
        {tuple(c["layers"]): c["kl"] for c in students.measured_layers(loaded.model, b, 2, vocab)[1]}
        for b in (task, text)
    ]
    for candidate in both:
        key = tuple(candidate["layers"])
        assert candidate["kl"] == pytest.approx((alone[0][key] + alone[1][key]) / 2, rel=1e-5)
    assert alone[0] != pytest.approx(alone[1])  # the two batches do disagree, so the mix matters
