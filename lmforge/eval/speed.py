"""Footprint of a loaded model: how big, how fast, how much memory.

Prompt throughput is a batch of general-probe text through one forward pass that keeps only the last
position's logits, as generation's prefill does (full logits for 4 x 256 tokens would be a 200 MB buffer on a
49k vocabulary, the largest thing a distillation run allocated after training); per-token latency is the
difference between generating 33 and 1 new tokens (prefill cancels out), batch 1, KV cache on. Each
timing is the median of `repeats` runs, because this machine is shared and noisy.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from lmforge.data.probe import general_text
from lmforge.report.record import peak_rss_bytes

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def size_on_disk(folder: str | Path) -> int:
    """Bytes of weight files in a model folder."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.suffix in _WEIGHT_SUFFIXES)


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_footprint(loaded, repeats: int = 3, prompt_tokens: int = 256, batch: int = 4) -> dict:
    """Parameters, bytes on disk, load time, peak RSS, prompt tokens/s and ms per generated token."""
    model, tokenizer = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    text = " ".join(general_text(n_docs=4))
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :prompt_tokens]
    prompt = ids.repeat(batch, 1).to(device)
    with torch.no_grad():
        prefill = _median_seconds(lambda: model(input_ids=prompt, logits_to_keep=1), repeats)
        short = ids[:, :16].to(device)

        def generate(n: int):
            return lambda: model.generate(
                input_ids=short,
                attention_mask=torch.ones_like(short),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )

        one, many = _median_seconds(generate(1), repeats), _median_seconds(generate(33), repeats)
    return {
        "params_total": sum(p.numel() for p in model.parameters()),
        "size_bytes": size_on_disk(loaded.folder),
        "load_s": round(loaded.load_s, 3),
        "peak_rss_bytes": peak_rss_bytes(),
        "prompt_tokens_per_s": round(prompt.numel() / prefill, 1),
        "ms_per_token": round(max(many - one, 0.0) / 32 * 1000, 3),
    }
