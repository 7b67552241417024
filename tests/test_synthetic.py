"""Built-in synthetic tasks: determinism, fixed disjoint splits, answers recomputable from prompts."""

from __future__ import annotations

import datetime
import json
import re

import pytest

from lmforge.data import synthetic
from lmforge.data.synthetic import GENERATORS, TEST_SIZE, TRAIN_SIZE, examples, export_jsonl
from lmforge.errors import UserError

TASKS = list(GENERATORS)


def test_at_least_four_tasks_with_named_generators():
    assert {"dates", "arithmetic", "kv_recall", "extraction"} <= set(TASKS)
    for name, gen in GENERATORS.items():
        assert gen.name == name
        assert gen.skill and "\n" not in gen.skill


@pytest.mark.parametrize("task", TASKS)
def test_sizes_and_record_shape(task):
    train, test = examples(task, "train"), examples(task, "test")
    assert (len(train), len(test)) == (TRAIN_SIZE, TEST_SIZE)
    for record in train[:50] + test[:50]:
        assert set(record) == {"prompt", "answer"}
        assert isinstance(record["answer"], str)
        assert record["answer"] == record["answer"].strip() and "\n" not in record["answer"]
        assert "only" in record["prompt"]  # every prompt states the output format


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_and_n_takes_prefix(task):
    for split in ("train", "test"):
        first = examples(task, split)
        synthetic._split.cache_clear()
        assert examples(task, split) == first
        assert examples(task, split, n=7) == first[:7]
    first[0]["answer"] = "mutated"  # callers get copies, not the cache
    assert examples(task, "test")[0]["answer"] != "mutated"


@pytest.mark.parametrize("task", TASKS)
def test_splits_disjoint_and_prompts_distinct(task):
    train = [r["prompt"] for r in examples(task, "train")]
    test = [r["prompt"] for r in examples(task, "test")]
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert not set(train) & set(test)


def test_seed_is_stable_and_split_specific():
    assert synthetic._seed("dates", "train") == synthetic._seed("dates", "train")
    assert synthetic._seed("dates", "train") != synthetic._seed("dates", "test")
    assert examples("dates", "test", 1) == [
        {
            "prompt": "Rewrite the date 2012-08-06 in the format DD/MM/YYYY. Answer with the date only.",
            "answer": "06/08/2012",
        }
    ]


def _both(task):
    return examples(task, "test") + examples(task, "train", 300)


def test_dates_answers_recomputable():
    for r in _both("dates"):
        iso = re.search(r"(\d{4}-\d{2}-\d{2})", r["prompt"]).group(1)
        assert r["answer"] == datetime.date.fromisoformat(iso).strftime("%d/%m/%Y")


def test_arithmetic_answers_recomputable():
    for r in _both("arithmetic"):
        a, op, b = re.search(r"Compute (\d{3}) ([+-]) (\d{3})\.", r["prompt"]).groups()
        assert int(r["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))


def test_kv_recall_answers_recomputable():
    for r in _both("kv_recall"):
        pairs = dict(re.findall(r"^([a-z]+): ([A-Z0-9]{5})$", r["prompt"], flags=re.MULTILINE))
        assert 5 <= len(pairs) <= 8
        key = re.search(r"value of the key ([a-z]+)\?", r["prompt"]).group(1)
        assert r["answer"] == pairs[key]


def test_extraction_answers_parse_and_appear_in_prompt():
    for r in _both("extraction"):
        record = json.loads(r["answer"])
        assert list(record) == ["name", "age", "city"]
        assert isinstance(record["age"], int) and isinstance(record["name"], str)
        sentence = r["prompt"].split("Sentence: ", 1)[1]
        for value in record.values():
            assert re.search(rf"\b{re.escape(str(value))}\b", sentence)
        assert r["answer"] == json.dumps(record)  # compact, fixed key order


def test_sorting_answers_recomputable():
    for r in _both("sorting"):
        numbers = [int(x) for x in re.search(r"largest: ([\d, ]+)\.", r["prompt"]).group(1).split(", ")]
        assert r["answer"] == ", ".join(map(str, sorted(numbers)))


def test_unknown_task_names_known_ones():
    with pytest.raises(UserError, match="unknown task 'nope'") as info:
        examples("nope", "train")
    assert all(task in str(info.value) for task in TASKS)
    assert "\n" not in str(info.value)


def test_unknown_split_names_known_ones():
    with pytest.raises(UserError, match="unknown split 'dev'") as info:
        examples("dates", "dev")
    assert "train" in str(info.value) and "test" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("task", TASKS)
def test_export_jsonl_round_trips(task, tmp_path):
    path = tmp_path / f"{task}.jsonl"
    count = export_jsonl(task, "test", path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert count == len(lines) == TEST_SIZE
    assert [json.loads(line) for line in lines] == examples(task, "test")
