"""Routing accuracy of a mixture of experts: the share of each task's tokens its router sends to that task's expert.

Each task's test prompts are rendered as evaluation renders them (chat_prompt: the chat template with the
generation prompt) followed by the reference answer, so the tokens counted are those the model reads and
writes while answering. A token counts as sent to an expert when that expert is its router's top choice;
the share is over every real token and every MoE layer. The router logits come from transformers' own
forward (`output_router_logits`), so this measures the model as loaded, not a re-implementation of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from lmforge.data.chat import chat_prompt
from lmforge.eval.tasks import get_task


def task_texts(task_name: str, limit: int, tokenizer) -> list[str]:
    """The first `limit` test records of a task as prompt (chat-rendered) + answer text."""
    task = get_task(task_name)
    docs = list(task.docs())[:limit]
    return [chat_prompt(tokenizer, doc["prompt"]) + str(doc.get("answer", "")) for doc in docs]


@torch.no_grad()
def expert_shares(model, tokenizer, texts: Sequence[str], batch_size: int = 8) -> torch.Tensor:
    """Share of (token, layer) pairs whose top-1 routed expert is each expert: float tensor [num_experts]."""
    counts: torch.Tensor | None = None
    tokenizer.padding_side = "right"
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start : start + batch_size]), return_tensors="pt", padding=True)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        out = model(**batch, output_router_logits=True)
        keep = batch["attention_mask"].reshape(-1).bool()
        for logits in out.router_logits:  # one [batch*seq, E] per MoE layer
            top = logits.reshape(keep.shape[0], -1)[keep].argmax(dim=-1)
            found = torch.bincount(top.cpu(), minlength=logits.shape[-1]).double()
            counts = found if counts is None else counts + found
    assert counts is not None, "no texts to route"
    return counts / counts.sum()


def routing_accuracy(folder: str | Path, tasks: Sequence[str], limit: int = 30, device: str = "cpu") -> dict:
    """{"by_task": {task: share sent to its expert}, "shares": {task: [share per expert]}, "mean": ...}.

    Args:
        folder: the MoE model folder.
        tasks: one task per routed expert, in the experts' order (expert i should get task i).
        limit: test records per task.
    """
    from lmforge.models.load import load_model

    loaded = load_model(folder, dtype="float32", device=device)
    shares = {
        task: expert_shares(loaded.model, loaded.tokenizer, task_texts(task, limit, loaded.tokenizer)) for task in tasks
    }
    by_task = {task: round(float(shares[task][i]), 4) for i, task in enumerate(tasks)}
    return {
        "by_task": by_task,
        "shares": {task: [round(float(s), 4) for s in share] for task, share in shares.items()},
        "mean": round(sum(by_task.values()) / len(by_task), 4),
        "limit": limit,
    }
