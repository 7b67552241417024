"""Exact answers of the built-in tasks, recomputed from the prompt: the filter's verifier, and wrong answers on purpose.

`SOLVERS` maps each task of data/synthetic.py to a function that reads one of its prompts and returns the
answer the generator would have written (None when the prompt is not of that task's shape), so a record of
any origin (a teacher's output, a user's file, a scraped copy) is checked against the exact answer, not
against a stored table. tests/test_data_filter.py checks every solver against both fixed splits, so a
generator that changes without its solver fails there. `corrupt` gives a seeded share of records another
record's answer (right format, wrong value): the noisy-answer benchmark of bench/filter_noisy.py.
"""

from __future__ import annotations

import datetime
import json
import random
import re
from collections.abc import Callable

from lmforge.data.synthetic import PHRASINGS
from lmforge.errors import UserError


def solve_dates(prompt: str) -> str | None:
    match = re.search(r"Rewrite the date (\d{4})-(\d{2})-(\d{2}) in the format DD/MM/YYYY\.", prompt)
    if not match:
        return None
    try:
        day = datetime.date(*map(int, match.groups()))
    except ValueError:  # 2023-02-30: no such date, no exact answer
        return None
    return day.strftime("%d/%m/%Y")


def solve_arithmetic(prompt: str) -> str | None:
    match = re.search(r"Compute (-?\d+) ([+-]) (-?\d+)\.", prompt)
    if not match:
        return None
    a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
    return str(a + b if op == "+" else a - b)


def solve_kv_recall(prompt: str) -> str | None:
    match = re.search(r"What is the value of the key (\S+)\?", prompt)
    if not match:
        return None
    pairs = dict(re.findall(r"^(\S+): (\S+)$", prompt, flags=re.MULTILINE))
    return pairs.get(match.group(1))


def _phrasing_pattern(phrasing: str) -> re.Pattern:
    """A regex from a generator phrasing: {name} and {city} one capitalised word, {age} digits; a repeated
    field must repeat its first match."""
    pattern, seen = re.escape(phrasing), set()
    for name, part in (("name", r"[A-Z]\w*"), ("city", r"[A-Z]\w*"), ("age", r"\d+")):
        escaped = re.escape("{" + name + "}")
        first = pattern.find(escaped)
        if first >= 0:
            seen.add(name)
            head, tail = pattern[: first + len(escaped)], pattern[first + len(escaped) :]
            pattern = head.replace(escaped, f"(?P<{name}>{part})") + tail.replace(escaped, f"(?P={name})")
    return re.compile(f"^{pattern}$")


_SENTENCES = [_phrasing_pattern(p) for p in PHRASINGS]


def solve_extraction(prompt: str) -> str | None:
    match = re.search(r"^Sentence: (.*)$", prompt, flags=re.MULTILINE)
    if not match:
        return None
    for pattern in _SENTENCES:
        found = pattern.match(match.group(1).strip())
        if found:
            return json.dumps({"name": found["name"], "age": int(found["age"]), "city": found["city"]})
    return None


def solve_sorting(prompt: str) -> str | None:
    match = re.search(r"Sort these numbers from smallest to largest: ([\d, -]+)\.", prompt)
    if not match:
        return None
    numbers = [int(part) for part in match.group(1).split(",") if part.strip()]
    return ", ".join(map(str, sorted(numbers)))


SOLVERS: dict[str, Callable[[str], str | None]] = {
    "dates": solve_dates,
    "arithmetic": solve_arithmetic,
    "kv_recall": solve_kv_recall,
    "extraction": solve_extraction,
    "sorting": solve_sorting,
}


def corrupt(records: list[dict], share: float, seed: int = 0, key: str = "answer") -> tuple[list[dict], set[int]]:
    """Copies of `records` where a seeded `share` of them carry another record's (different) `key` value.

    Returns the records and the indices that were made wrong.
    """
    if not 0 <= share <= 1:
        raise UserError(f"noise share must be in [0, 1], got {share}")
    count = round(share * len(records))
    rng = random.Random(seed)
    chosen = set(rng.sample(range(len(records)), count))
    noisy = [dict(record) for record in records]
    for index in sorted(chosen):
        right = records[index][key]
        others = [r[key] for r in rng.sample(records, min(len(records), 20)) if r[key] != right]
        if not others:
            raise UserError(f"cannot corrupt record {index}: no other record has a different '{key}'")
        noisy[index][key] = others[0]
    return noisy, chosen
