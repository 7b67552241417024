"""GGUF export round trip: what transformers loads back from our GGUF matches the safetensors folder."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmforge.models.gguf import read_gguf_metadata, write_llama_gguf

GGUF_NAME = "model.gguf"
TEXTS = ["Hello world", "the answer is 42, isn't it?", "Héllo wörld ☃ 日本", "  spaces\tand\nnewlines 2024."]
MESSAGES = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It's 4."}]


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_llama_tied"])
def pair(request, tmp_path_factory):
    """The folder's model and tokenizer next to the ones loaded back from its GGUF (written once)."""
    folder = request.getfixturevalue(request.param)
    out_dir = tmp_path_factory.mktemp(f"{request.param}_gguf")
    path = write_llama_gguf(folder, out_dir / GGUF_NAME)
    return SimpleNamespace(
        name=request.param,
        path=path,
        model=AutoModelForCausalLM.from_pretrained(folder).eval(),
        tokenizer=AutoTokenizer.from_pretrained(folder),
        gguf_model=AutoModelForCausalLM.from_pretrained(out_dir, gguf_file=GGUF_NAME).eval(),
        gguf_tokenizer=AutoTokenizer.from_pretrained(out_dir, gguf_file=GGUF_NAME),
    )


def test_logits_match(pair):
    assert pair.gguf_model.config.tie_word_embeddings == (pair.name == "tiny_llama_tied")
    vocab = pair.model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    batches = [
        torch.tensor([[1, 72, 105, 2]]),
        torch.randint(0, vocab, (2, 11), generator=generator),
        torch.arange(vocab).reshape(1, -1),  # every embedding row, and positions well past head_dim
    ]
    with torch.no_grad():
        for ids in batches:
            expected = pair.model(ids).logits
            torch.testing.assert_close(pair.gguf_model(ids).logits, expected, atol=1e-5, rtol=0)


def test_tokenizer_matches(pair):
    original, loaded = pair.tokenizer, pair.gguf_tokenizer
    assert loaded.chat_template == original.chat_template
    rendered = original.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered == loaded.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered.count("<|im_start|>") == 3
    for text in [*TEXTS, rendered]:
        assert loaded(text)["input_ids"] == original(text)["input_ids"], text
    # the ChatML markers stay whole, as the special tokens they are
    assert loaded(rendered)["input_ids"][0] == original.convert_tokens_to_ids("<|im_start|>")
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(loaded, attr) == getattr(original, attr), attr


def test_read_gguf_metadata(pair):
    metadata = read_gguf_metadata(pair.path)
    config = pair.model.config
    assert metadata["general.architecture"] == "llama"
    assert metadata["llama.block_count"] == config.num_hidden_layers
    assert metadata["llama.attention.head_count_kv"] == config.num_key_value_heads
    assert metadata["tokenizer.ggml.model"] == "gpt2"
    assert "tokenizer.ggml.tokens" not in metadata  # arrays are left out
