"""The three scoring calls against naive computations on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.eval import scoring
from lmforge.models.load import load_model

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3, "Assignment statements bind names.", "a"]


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return load_model(tiny_llama, device="cpu")


def naive_loglikelihood(model, ids: list[int]) -> float:
    """Sum of log p(ids[i] | ids[:i]) for i >= 1, from one unpadded forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logprobs = logits.log_softmax(-1)
    return sum(logprobs[i - 1, ids[i]].item() for i in range(1, len(ids)))


def test_rolling_matches_naive_per_token_sum(tiny):
    prefix = tiny.tokenizer.bos_token_id
    totals = scoring.loglikelihood_rolling(tiny.model, tiny.tokenizer, TEXTS, batch_size=2, max_length=512)
    for text, (total, count) in zip(TEXTS, totals, strict=True):
        ids = [prefix] + tiny.tokenizer.encode(text, add_special_tokens=False)
        assert count == len(ids) - 1
        expected = naive_loglikelihood(tiny.model, ids)
        assert total == pytest.approx(expected, rel=1e-4)
        assert math.exp(-total / count) == pytest.approx(math.exp(-expected / count), rel=1e-4)


def test_rolling_windows_predict_every_token_once_with_max_context(tiny):
    text = TEXTS[0]
    window = 16
    ids = [tiny.tokenizer.bos_token_id] + tiny.tokenizer.encode(text, add_special_tokens=False)
    ((total, count),) = scoring.loglikelihood_rolling(tiny.model, tiny.tokenizer, [text], max_length=window)
    assert count == len(ids) - 1
    expected = 0.0
    for j in range(len(ids) - 1):  # token j+1 predicted from the last `window` tokens, block by block
        block_end = min((j // window + 1) * window, len(ids) - 1)
        first = max(0, block_end - window)
        context = ids[first : j + 1]
        with torch.no_grad():
            logprobs = tiny.model(torch.tensor([context])).logits[0, -1].double().log_softmax(-1)
        expected += logprobs[ids[j + 1]].item()
    assert total == pytest.approx(expected, rel=1e-4)


def test_loglikelihood_matches_hand_sum(tiny):
    tok = tiny.tokenizer
    pairs = [("Question: is it?\nAnswer:", " yes"), ("Question: is it?\nAnswer:", " no way"), ("x", "yz")]
    scores = scoring.loglikelihood(tiny.model, tok, pairs, batch_size=3)
    for (context, continuation), (score, greedy) in zip(pairs, scores, strict=True):
        context_ids = tok.encode(context, add_special_tokens=False)
        whole = tok.encode(context + continuation, add_special_tokens=False)
        with torch.no_grad():
            logprobs = tiny.model(torch.tensor([whole])).logits[0].double().log_softmax(-1)
        cont = range(len(context_ids), len(whole))
        assert score == pytest.approx(sum(logprobs[i - 1, whole[i]].item() for i in cont), rel=1e-5)
        assert greedy == all(logprobs[i - 1].argmax().item() == whole[i] for i in cont)


def test_loglikelihood_greedy_flag_true_for_argmax_continuation(tiny):
    tok = tiny.tokenizer
    context_ids = tok.encode("hello", add_special_tokens=False)
    with torch.no_grad():
        best = tiny.model(torch.tensor([context_ids])).logits[0, -1].argmax().item()
    continuation = tok.decode([best])
    if tok.encode("hello" + continuation, add_special_tokens=False) != context_ids + [best]:
        pytest.skip("argmax token merges with the context under this tokenizer")
    ((_, greedy),) = scoring.loglikelihood(tiny.model, tok, [("hello", continuation)])
    assert greedy


def test_batched_generation_equals_unbatched(tiny):
    prompts = ["hello", "the quick brown fox", "a", "<|im_start|>user\nhi there<|im_end|>\n", "2024-01-31"]
    batched = scoring.generate_until(tiny.model, tiny.tokenizer, prompts, stop=["\n"], max_new_tokens=12, batch_size=5)
    single = scoring.generate_until(tiny.model, tiny.tokenizer, prompts, stop=["\n"], max_new_tokens=12, batch_size=1)
    assert batched == single
    assert any(batched)  # a random model still says something


def test_generation_equals_manual_greedy_loop_and_stops(tiny):
    tok = tiny.tokenizer
    prompt = "the quick brown fox"
    ids = tok.encode(prompt, add_special_tokens=False)
    for _ in range(10):
        with torch.no_grad():
            ids.append(tiny.model(torch.tensor([ids])).logits[0, -1].argmax().item())
    manual = tok.decode(ids[len(tok.encode(prompt, add_special_tokens=False)) :], skip_special_tokens=True)
    (generated,) = scoring.generate_until(tiny.model, tok, [prompt], stop=[], max_new_tokens=10)
    assert generated == manual
    stop = manual[3:5]
    (cut,) = scoring.generate_until(tiny.model, tok, [prompt], stop=[stop], max_new_tokens=10)
    assert cut == manual[: manual.index(stop)]


def test_loglikelihood_with_empty_context_starts_from_prefix_token(tiny):
    tok = tiny.tokenizer
    ((score, _),) = scoring.loglikelihood(tiny.model, tok, [("", "hello there")])
    ids = [tok.bos_token_id] + tok.encode("hello there", add_special_tokens=False)
    assert score == pytest.approx(naive_loglikelihood(tiny.model, ids), rel=1e-5)
