"""The general text probe: real human-written English that every CPython ships, for perplexity and
forgetting checks with no download.

The prose of the Python reference manual lives in `pydoc_data.topics` (written by people, not models).
We take the longest topics in a fixed order and cut each at a paragraph boundary, so the probe is the same
on every machine with the same Python minor version (its version is recorded with every score).
"""

from __future__ import annotations

import sys


def general_text(n_docs: int = 24, max_chars: int = 2000) -> list[str]:
    """`n_docs` passages of the Python reference manual, each at most `max_chars` characters."""
    from pydoc_data.topics import topics

    names = sorted(topics, key=lambda name: (-len(topics[name]), name))[:n_docs]
    return [_first_paragraphs(topics[name], max_chars) for name in sorted(names)]


def probe_version() -> str:
    """Identifies the probe's text: it changes only with the Python minor version."""
    return f"pydoc_data.topics/python{sys.version_info.major}.{sys.version_info.minor}"


def _first_paragraphs(text: str, max_chars: int) -> str:
    kept, size = [], 0
    for paragraph in text.strip().split("\n\n"):
        if size + len(paragraph) > max_chars and kept:
            break
        kept.append(paragraph)
        size += len(paragraph) + 2
    return "\n\n".join(kept)[:max_chars]
