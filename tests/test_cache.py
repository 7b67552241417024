"""File digests are remembered across runs (recipes and eval records cite multi-GB weights) and forgotten the
moment a file changes: a stale digest would let a recipe keep a step whose input was retrained."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from lmforge import cache


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "_known", None)  # a new process: nothing in memory yet
    return tmp_path / "cache" / "digests.json"


def test_digest_is_the_files_sha256_and_is_remembered_on_disk(tmp_path, fresh_cache):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights" * 1000)
    assert cache.file_sha256(weights) == hashlib.sha256(weights.read_bytes()).hexdigest()
    remembered = json.loads(fresh_cache.read_text())
    assert list(remembered.values()) == [hashlib.sha256(weights.read_bytes()).hexdigest()]


def test_a_later_run_reuses_the_remembered_digest_without_reading_the_file(tmp_path, fresh_cache, monkeypatch):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 100)
    first = cache.file_sha256(weights)
    monkeypatch.setattr(cache, "_known", None)  # the next run reads digests.json
    monkeypatch.setattr(cache, "_hash_file", lambda path: pytest.fail(f"{path} was hashed again"))
    assert cache.file_sha256(weights) == first


def test_rewritten_bytes_of_the_same_size_get_a_new_digest(tmp_path, fresh_cache):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 100)
    before = cache.file_sha256(weights)
    weights.write_bytes(b"b" * 100)  # retrained: same name and size, new bytes and mtime
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert cache.file_sha256(weights) == hashlib.sha256(b"b" * 100).hexdigest() != before


def test_a_corrupt_digests_file_is_ignored(tmp_path, fresh_cache):
    fresh_cache.parent.mkdir(parents=True)
    fresh_cache.write_text("{half a json")
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"x")
    assert cache.file_sha256(weights) == hashlib.sha256(b"x").hexdigest()
    assert json.loads(fresh_cache.read_text())  # rewritten whole and readable again
