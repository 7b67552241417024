"""Session fixtures: tiny random llama models built locally, and their GGUF twin (nothing downloads)."""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch

from lmforge.models import compat  # noqa: F401  (bitsandbytes imported offline before a test imports PEFT)
from lmforge.models.gguf import write_llama_gguf
from lmforge.models.tiny import make_tiny_llama


@pytest.fixture(scope="session", autouse=True)
def _isolated_and_single_threaded(tmp_path_factory):
    """Keep the GGUF cache out of the user's home; tiny matmuls gain nothing from threads on a busy CPU."""
    previous_cache, previous_threads = os.environ.get("LMFORGE_CACHE"), torch.get_num_threads()
    os.environ["LMFORGE_CACHE"] = str(tmp_path_factory.mktemp("lmforge_cache"))
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous_threads)
    if previous_cache is None:
        os.environ.pop("LMFORGE_CACHE", None)
    else:
        os.environ["LMFORGE_CACHE"] = previous_cache


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """Folder of a 2-layer random llama (hidden 32) with a byte-level BPE tokenizer and chat template."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), seed=0)


@pytest.fixture(scope="session")
def tiny_llama_tied(tmp_path_factory):
    """Same shape as `tiny_llama`, other seed, tied input/output embeddings (as SmolLM2 has)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama_tied"), seed=1, tie_embeddings=True)


@pytest.fixture(scope="session")
def tiny_gguf(tiny_llama_tied, tmp_path_factory):
    """The tied tiny llama written as an F32 GGUF file by the `gguf` package."""
    return write_llama_gguf(tiny_llama_tied, tmp_path_factory.mktemp("tiny_gguf") / "tiny.gguf")


@pytest.fixture
def swapped_vocabulary_llama(tmp_path):
    """A tiny llama whose tokenizer swaps the ids of 'a' and 'b': a vocabulary that really differs."""
    folder = make_tiny_llama(tmp_path / "swapped_vocabulary", seed=3)
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return folder


@pytest.fixture(scope="module")
def one_timing_repeat():
    """Distillation's footprint times are medians of 3 runs; one is enough for tests that check the record."""
    from lmforge.distill import run as distill_run

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(distill_run, "measure_footprint", functools.partial(distill_run.measure_footprint, repeats=1))
        yield
