"""What lmforge keeps between runs because it can recompute it: converted GGUF folders and file digests.

Digests of weight files are what recipes and evaluation records use to tell retrained weights apart (same
names and shapes, new bytes), so a run reads every cited file whole. Hashing a multi-GB model again on every
run (a `--dry-run` included) is wasted time: a digest is remembered per (path, inode, size, mtime) in memory
and in `digests.json` under the cache folder, the same key rsync and make trust for "unchanged".
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

_DIGESTS_FILE = "digests.json"
_known: dict[str, str] | None = None  # "path|inode|size|mtime_ns" -> sha256 hex, loaded once per process


def cache_dir() -> Path:
    """Where converted GGUF folders and remembered digests live: $LMFORGE_CACHE, else ~/.cache/lmforge."""
    return Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge"))


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes; remembered until the file's inode, size or mtime changes."""
    global _known
    path = Path(path)
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_ino}|{stat.st_size}|{stat.st_mtime_ns}"
    if _known is None:
        _known = _read_digests()
    if key not in _known:
        _known[key] = _hash_file(path)
        _write_digests(_known)
    return _known[key]


def _hash_file(path: Path) -> str:
    digest, buffer = hashlib.sha256(), bytearray(1 << 22)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def _read_digests() -> dict[str, str]:
    try:
        known = json.loads((cache_dir() / _DIGESTS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, unreadable or half-written by a crash: start afresh
        return {}
    return known if isinstance(known, dict) else {}


def _write_digests(known: dict[str, str]) -> None:
    """Replace the digests file whole, so a concurrent reader sees the old or the new one; best effort."""
    target = cache_dir() / _DIGESTS_FILE
    staging = target.with_name(f".{_DIGESTS_FILE}.{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.write_text(json.dumps(known), encoding="utf-8")
        os.replace(staging, target)
    except OSError:  # a read-only cache folder costs a rehash next run, nothing else
        staging.unlink(missing_ok=True)
