"""`--columns prompt=question,completion=answer`: the flag form of `data.columns`, read the same by every verb.

A module of its own, importing nothing heavy, so the CLI (`lmforge --help` stays fast) and the verbs kept
beside their packages (distill/command.py) share one parser without importing each other.
"""

from __future__ import annotations

from lmforge.errors import UserError


def parse_columns(text: str | None) -> dict[str, str] | None:
    """'prompt=question,completion=answer' -> {'prompt': 'question', 'completion': 'answer'}."""
    if not text:
        return None
    mapping = {}
    for pair in text.split(","):
        canonical, sep, theirs = pair.partition("=")
        if not sep or not canonical.strip() or not theirs.strip():
            raise UserError(f"bad --columns entry '{pair}': write CANONICAL=YOURKEY, e.g. prompt=question")
        mapping[canonical.strip()] = theirs.strip()
    return mapping
