"""Built-in synthetic tasks: deterministic (prompt, answer) generators with exact answers.

Each task probes one skill (format conversion, arithmetic, in-context lookup, structured extraction,
ordering) and is used to fine-tune, distill and merge models and to measure whether a method paid off.
Design choices: every prompt states the exact output format, every answer is one short line, so exact
match after stripping is fair; splits are fixed and seeded from a SHA-256 of "task:split" (never Python's
randomised `hash()`), the test split is drawn first and the train split skips its prompts, so the two
are disjoint; tasks live in a plain dict literal, no registration magic. `dates` is the easy task, the
others are harder so that the choice of method shows.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from lmforge.errors import UserError

TRAIN_SIZE = 2000
TEST_SIZE = 200
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Generator:
    """A named task: `make(rng)` returns one {"prompt", "answer"} record."""

    name: str
    skill: str
    make: Callable[[random.Random], dict]


def make_dates(rng: random.Random) -> dict:
    """Format conversion: rewrite an ISO date (YYYY-MM-DD) as DD/MM/YYYY."""
    day = datetime.date(1950, 1, 1) + datetime.timedelta(days=rng.randrange(100 * 365))
    prompt = f"Rewrite the date {day.isoformat()} in the format DD/MM/YYYY. Answer with the date only."
    return {"prompt": prompt, "answer": day.strftime("%d/%m/%Y")}


def make_arithmetic(rng: random.Random) -> dict:
    """Multi-digit arithmetic: add or subtract two 3-digit numbers (the result may be negative)."""
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    op = rng.choice("+-")
    result = a + b if op == "+" else a - b
    prompt = f"Compute {a} {op} {b}. Answer with the number only."
    return {"prompt": prompt, "answer": str(result)}


_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
_CODE_CHARS = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"


def make_kv_recall(rng: random.Random) -> dict:
    """In-context lookup: find one made-up key's code in a list of 5-8 "key: value" pairs."""
    count = rng.randint(5, 8)
    keys: list[str] = []
    while len(keys) < count:
        key = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3)))
        if key not in keys:
            keys.append(key)
    codes = ["".join(rng.choice(_CODE_CHARS) for _ in range(5)) for _ in keys]
    target = rng.randrange(count)
    lines = "\n".join(f"{k}: {c}" for k, c in zip(keys, codes, strict=True))
    prompt = (
        f"Here is a list of key: value pairs.\n{lines}\n"
        f"What is the value of the key {keys[target]}? Answer with the value only."
    )
    return {"prompt": prompt, "answer": codes[target]}


_NAMES = [
    "Maria",
    "Jonas",
    "Aiko",
    "Pedro",
    "Fatima",
    "Liam",
    "Chloe",
    "Ivan",
    "Nadia",
    "Omar",
    "Greta",
    "Kenji",
    "Sofia",
    "Tomas",
    "Amara",
    "Lucas",
    "Elena",
    "Rahul",
    "Zoe",
    "Mateo",
    "Ingrid",
    "Kwame",
    "Yara",
    "Felix",
    "Hana",
    "Diego",
    "Leila",
    "Oskar",
    "Priya",
    "Bruno",
]
_CITIES = [
    "Lyon",
    "Oslo",
    "Porto",
    "Kyoto",
    "Lima",
    "Cairo",
    "Dublin",
    "Quito",
    "Hanoi",
    "Leeds",
    "Turin",
    "Graz",
    "Accra",
    "Perth",
    "Bergen",
    "Seville",
    "Krakow",
    "Nantes",
    "Austin",
    "Osaka",
    "Bremen",
    "Malmo",
    "Tartu",
    "Cusco",
    "Split",
]
PHRASINGS = [
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}, a {age}-year-old from {city}.",
    "Living in {city}, {name} turned {age} this spring.",
    "{city} has been home to {name} for years; {name} is now {age}.",
    "At {age}, {name} still cycles to work every day in {city}.",
    "The new tenant in {city} is {name}, aged {age}.",
]


def make_extraction(rng: random.Random) -> dict:
    """Structured extraction: pull name, age and city out of a varied sentence into compact JSON."""
    name, city, age = rng.choice(_NAMES), rng.choice(_CITIES), rng.randint(18, 90)
    sentence = rng.choice(PHRASINGS).format(name=name, age=age, city=city)
    prompt = (
        "Extract the person's name, age and city from the sentence below. Answer with one line of "
        'JSON only, keys in this order: {"name": ..., "age": ..., "city": ...}.\n'
        f"Sentence: {sentence}"
    )
    return {"prompt": prompt, "answer": json.dumps({"name": name, "age": age, "city": city})}


def make_sorting(rng: random.Random) -> dict:
    """Ordering: sort 5-7 distinct two-digit numbers ascending, answer comma-separated."""
    numbers = rng.sample(range(10, 100), rng.randint(5, 7))
    prompt = (
        f"Sort these numbers from smallest to largest: {', '.join(map(str, numbers))}. "
        "Answer with the sorted numbers separated by commas only."
    )
    return {"prompt": prompt, "answer": ", ".join(map(str, sorted(numbers)))}


GENERATORS: dict[str, Generator] = {
    "dates": Generator("dates", "date reformatting, YYYY-MM-DD to DD/MM/YYYY (easy)", make_dates),
    "arithmetic": Generator("arithmetic", "add or subtract two 3-digit numbers (hard)", make_arithmetic),
    "kv_recall": Generator("kv_recall", "look up a made-up key's code among 5-8 pairs in the prompt", make_kv_recall),
    "extraction": Generator("extraction", "name, age and city from a sentence to compact JSON", make_extraction),
    "sorting": Generator("sorting", "sort 5-7 two-digit numbers ascending", make_sorting),
}


def _seed(task: str, split: str) -> int:
    """Stable seed from the task and split names (same on every run and machine)."""
    return int.from_bytes(hashlib.sha256(f"{task}:{split}".encode()).digest()[:8], "big")


def _draw(task: str, split: str, size: int, exclude: frozenset[str]) -> list[dict]:
    """`size` records with distinct prompts, none in `exclude`."""
    make = GENERATORS[task].make
    rng = random.Random(_seed(task, split))
    seen, records = set(exclude), []
    for _ in range(size * 50):
        record = make(rng)
        if record["prompt"] not in seen:
            seen.add(record["prompt"])
            records.append(record)
            if len(records) == size:
                return records
    raise RuntimeError(f"task {task!r} cannot produce {size} distinct {split} prompts")


@cache
def _split(task: str, split: str) -> tuple[tuple[str, str], ...]:
    """The whole split, cached; test is drawn first and train skips its prompts."""
    test = _draw(task, "test", TEST_SIZE, frozenset())
    records = test if split == "test" else _draw(task, "train", TRAIN_SIZE, frozenset(r["prompt"] for r in test))
    return tuple((r["prompt"], r["answer"]) for r in records)


def examples(task: str, split: str, n: int | None = None) -> list[dict]:
    """The first `n` (default all) {"prompt", "answer"} records of `task`'s fixed `split`."""
    if task not in GENERATORS:
        raise UserError(f"unknown task {task!r}; known tasks: {', '.join(GENERATORS)}")
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
    records = _split(task, split)
    if n is not None:
        records = records[:n]
    return [{"prompt": prompt, "answer": answer} for prompt, answer in records]


def export_jsonl(task: str, split: str, path: str | Path, noise: float = 0.0) -> int:
    """Write `task`'s `split` to `path`, one JSON object per line; return the number of records.

    `noise` gives that share of the records another record's answer (data/answers.py `corrupt`, seeded).
    """
    records = examples(task, split)
    if noise:
        from lmforge.data.answers import corrupt  # it reads this module's phrasings

        records, _ = corrupt(records, noise)
    with Path(path).open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return len(records)
