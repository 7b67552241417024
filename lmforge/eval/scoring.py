"""The three scoring calls every task reduces to, as lm-eval defines them [lme `LM` API].

- `loglikelihood`: log p(continuation | context) and whether greedy decoding would produce it;
- `loglikelihood_rolling`: log-likelihood of a whole text in windows of at most `max_length` tokens,
  each window keeping as much preceding context as fits (perplexity);
- `generate_until`: greedy generation until EOS or a stop string.
Requests are batched and sorted longest first (padding is minimal and an out-of-memory shows on the first
batch), then returned in the caller's order. Log-softmax runs in fp32 on the scored positions only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import GenerationConfig, StoppingCriteriaList, StopStringCriteria


def _by_length(items: Sequence, key: Callable[[object], int], batch_size: int) -> list[list[int]]:
    """Indices of `items` sorted longest first, cut into batches."""
    order = sorted(range(len(items)), key=lambda i: -key(items[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def padded(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows as one (rows, width) tensor padded with `pad_id` on the left or right, and its mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def _prefix_token(tokenizer) -> int:
    """Token that stands before a text with no context: BOS, else EOS (lm-eval 0.4's `prefix_token_id`)."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    raise ValueError("tokenizer has neither a BOS nor an EOS token to start a text with")


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _score_windows(model, windows: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int):
    """For each (input_ids, targets) window, the target log-probs at the last len(targets) positions.

    Returns per window a (sum of log-probs, all-targets-are-argmax) pair.
    """
    results: list[tuple[float, bool]] = [(0.0, True)] * len(windows)
    device = next(model.parameters()).device
    for batch in _by_length(windows, lambda w: len(w[0]), batch_size):
        ids, mask = padded([windows[i][0] for i in batch], pad_id, left=False)
        with torch.no_grad():
            states, are_logits = final_hidden_states(model, ids.to(device), mask.to(device))  # (batch, seq, d)
            head = (lambda x: x) if are_logits else model.get_output_embeddings()
            for row, index in enumerate(batch):
                inputs, targets = windows[index]
                end = len(inputs)
                target = torch.tensor(targets, device=device)
                results[index] = target_logprobs(head, states[row, end - len(targets) : end], target)
    return results


# Configs whose logits are more than the output projection of the final hidden state.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def final_hidden_states(model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Hidden states after the final norm, so logits can be formed only where they are scored.

    Forming (batch x seq x vocab) logits at once costs hundreds of MB for a 49k vocabulary; the output
    projection is applied per scored slice instead. Architectures that transform logits further fall back
    to the model's own logits. Returns (states, whether they are already logits).
    """
    if any(getattr(model.config, name, None) for name in LOGIT_TRANSFORMS):
        return model(input_ids=ids, attention_mask=mask).logits, True
    return model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state, False


def target_logprobs(head, states: torch.Tensor, target: torch.Tensor, chunk: int = 256) -> tuple[float, bool]:
    """Sum of log p(target) over (n, dim) states and whether every target is the argmax.

    `head` maps states to logits (the output projection); chunks of `chunk` positions keep memory flat.
    """
    total, greedy = 0.0, True
    for start in range(0, len(target), chunk):
        logprobs = head(states[start : start + chunk]).float().log_softmax(-1)  # (chunk, vocab)
        wanted = target[start : start + chunk]
        total += logprobs.gather(-1, wanted[:, None]).sum().item()
        greedy = greedy and bool((logprobs.argmax(-1) == wanted).all())
    return total, greedy


def loglikelihood(
    model, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 8, max_length: int = 2048
) -> list[tuple[float, bool]]:
    """Log p(continuation | context) for each (context, continuation) pair, and whether it is greedy.

    As lm-eval: the pair is tokenised whole and split after the context's tokens, so a merge across the
    boundary is scored on the continuation side; trailing spaces of the context move to the continuation.
    """
    windows = []
    for context, continuation in requests:
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if context:
            context_ids = _encode(tokenizer, context)
            continuation_ids = _encode(tokenizer, context + continuation)[len(context_ids) :]
        else:  # nothing to condition on: start from the prefix token, as rolling scoring does
            context_ids, continuation_ids = [_prefix_token(tokenizer)], _encode(tokenizer, continuation)
        inputs = (context_ids + continuation_ids)[:-1][-max_length:]
        windows.append((inputs, continuation_ids))
    return _score_windows(model, windows, tokenizer.pad_token_id or 0, batch_size)


def loglikelihood_rolling(
    model, tokenizer, texts: Sequence[str], batch_size: int = 8, max_length: int = 1024
) -> list[tuple[float, int]]:
    """Total log-likelihood of each text and its token count, in windows of at most `max_length` tokens.

    Every token is predicted exactly once; the first from the prefix token, the rest with as much
    preceding context as fits in the window.
    """
    windows, owner = [], []
    for index, text in enumerate(texts):
        seq = [_prefix_token(tokenizer)] + _encode(tokenizer, text)  # target j is seq[j + 1]
        for start in range(0, len(seq) - 1, max_length):
            end = min(start + max_length, len(seq) - 1)
            first = max(0, end - max_length)
            windows.append((seq[first:end], seq[start + 1 : end + 1]))
            owner.append(index)
    scores = _score_windows(model, windows, tokenizer.pad_token_id or 0, batch_size)
    totals = [[0.0, 0] for _ in texts]
    for index, (window, (logprob, _)) in zip(owner, zip(windows, scores, strict=True), strict=True):
        totals[index][0] += logprob
        totals[index][1] += len(window[1])
    return [(total, count) for total, count in totals]


def generate_until(
    model,
    tokenizer,
    prompts: Sequence[str],
    stop: Sequence[str] = ("\n",),
    max_new_tokens: int = 32,
    batch_size: int = 8,
) -> list[str]:
    """Greedy continuation of each prompt, cut at EOS or the first stop string (which is not kept)."""
    device = next(model.parameters()).device
    encoded = [_encode(tokenizer, p) for p in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id
    )
    # Built once per call: the criterion indexes the whole vocabulary (0.7 s for 49k tokens), which `stop_strings=`
    # would redo for every batch.
    markers = [marker for marker in stop if marker]
    stopping = StoppingCriteriaList([StopStringCriteria(tokenizer, markers)] if markers else [])
    outputs = [""] * len(prompts)
    for batch in _by_length(encoded, len, batch_size):
        ids, mask = padded([encoded[i] for i in batch], pad_id, left=True)
        with torch.no_grad():
            generated = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=config,
                stopping_criteria=stopping,
            )
        for row, index in enumerate(batch):
            text = tokenizer.decode(generated[row, ids.shape[1] :], skip_special_tokens=True)
            outputs[index] = _cut(text, stop)
    return outputs


def _cut(text: str, stop: Sequence[str]) -> str:
    for marker in stop:
        if marker and marker in text:
            text = text[: text.index(marker)]
    return text
