"""Worker for tests/test_multiprocess.py: the loop's three trainings (SFT, DPO, distillation) on tiny llamas.

Every rank of `accelerate launch --config_file configs/accelerate/ddp_cpu.yaml tests/ddp_worker.py MODELS OUT`
runs each case with 2 processes' settings; the test calls `run_case` in its own process for the one-process
reference over the same global batch. Rows differ in length, so the ranks hold different token counts, and
the two-process SFT splits micro-batches by a token budget, so the ranks run different micro-batch counts.
Writes OUT/<case>/history.json and weights.safetensors (rank 0) and OUT/<case>/rows-rank<r>.json (the row
ids each rank trained on), OUT/refusal-rank<r>.txt (optimizer_in_backward's line under 2 processes) and
OUT/export (a model saved by every rank through the runners' staged output: rank 0 alone may write it).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmforge.data.chat import render_example
from lmforge.data.packing import collate
from lmforge.distill import general
from lmforge.distill.objectives import Objective
from lmforge.distill.run import Guards
from lmforge.distill.run import make_loss_fn as distill_loss_fn
from lmforge.errors import UserError
from lmforge.finetune.dpo import add_reference_logprobs, collate_pairs, tokenize_pairs
from lmforge.finetune.dpo import make_loss_fn as dpo_loss_fn
from lmforge.finetune.lora import LoraSettings, attach_lora
from lmforge.models.load import load_model
from lmforge.outputs import save_model, staged_output
from lmforge.train.chunked import causal_lm_loss
from lmforge.train.loop import TrainConfig, train

SFT_ROWS = 24


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


# (batch_size, grad_accum, micro_batch_tokens) for 2 processes and for 1: the same rows per optimiser step
SETTINGS = {
    "sft": {2: (2, 2, 40), 1: (8, 1, 0)},  # one process: one big batch, no split
    "dpo": {2: (2, 1, 0), 1: (2, 2, 0)},
    "distill": {2: (2, 2, 0), 1: (4, 2, 0)},
}
MAX_GRAD_NORM = 0.25  # below the tiny models' gradient norms: clipping acts on every step


def records(n: int) -> list[dict]:
    """Prompts of 1 to 6 words, so rows (and the ranks' token counts) differ in length."""
    return [
        {"prompt": "Add " + " and ".join(str(i + k) for k in range(1 + i % 6)) + ".", "completion": str(i)}
        for i in range(n)
    ]


def sft_rows(tokenizer) -> list[dict]:
    rows = []
    for i, record in enumerate(records(SFT_ROWS)):
        example = render_example(tokenizer, record)
        ids = example.input_ids
        rows.append({"row": i, "input_ids": ids, "labels": example.labels, "position_ids": list(range(len(ids)))})
    return rows


def run_case(case: str, models: Path, out: Path, processes: int) -> None:
    """Train one case as `processes` processes would split it; rank 0 writes the history and weights."""
    batch_size, accum, budget = SETTINGS[case][processes]
    student = load_model(models / "tiny_tied" if case == "sft" else models / "tiny", device="cpu")
    tokenizer, pad = student.tokenizer, student.tokenizer.pad_token_id
    model, seen = student.model, []
    cfg = TrainConfig(
        lr=1e-2,
        max_steps=3,
        batch_size=batch_size,
        grad_accum=accum,
        micro_batch_tokens=budget,
        max_grad_norm=MAX_GRAD_NORM,
        schedule="constant",
        save_every=100,
    )
    if case == "sft":
        rows = sft_rows(tokenizer)
        loss_fn = causal_lm_loss

        def batch_of(chunk: list[dict]) -> dict:
            seen.extend(r["row"] for r in chunk)
            return collate([{k: v for k, v in r.items() if k != "row"} for r in chunk], pad)

    elif case == "dpo":
        pairs = [r | {"chosen": r["completion"], "rejected": r["completion"] + "0"} for r in records(12)]
        torch.manual_seed(0)
        model = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
        rows = add_reference_logprobs(model, tokenize_pairs(pairs, tokenizer, 64), pad)
        loss_fn = dpo_loss_fn(beta=0.1, loss_type="sigmoid")

        def batch_of(chunk: list[dict]) -> dict:
            return collate_pairs(chunk, pad)

    else:
        teacher = load_model(models / "tiny_tied", device="cpu").model.requires_grad_(False).eval()
        rows = [{k: v for k, v in r.items() if k != "row"} for r in sft_rows(tokenizer)]
        vocab = model.get_output_embeddings().weight.shape[0]
        task_loss = distill_loss_fn(teacher, None, [Objective("forward_kl")], vocab, 16, Guards())
        general_loss = distill_loss_fn(teacher, None, [Objective("reverse_kl")], vocab, 16, Guards())
        # the general-text mix, on by default: general rows of other lengths than the task's on every rank
        texts = [" ".join(["the cat sat on the mat"] * (1 + i % 4)) for i in range(7)]
        rows = general.units(rows, general.rows(texts, tokenizer, max_length=20), ratio=1.0)
        loss_fn = general.mixed_loss(task_loss, general_loss, 0.5, general.token_ratio(rows))

        def batch_of(chunk: list[dict]) -> dict:
            return general.mixed_collate(lambda r: collate(r, pad), lambda r: collate(r, pad))(chunk)

    folder = out / case
    folder.mkdir(parents=True, exist_ok=True)
    history = train(model, rows, loss_fn, batch_of, cfg, out / f"work-{case}-{processes}")
    (folder / f"rows-rank{rank()}.json").write_text(json.dumps(seen))
    if rank() == 0:
        (folder / "history.json").write_text(json.dumps(history))
        trained = {k: v.detach().contiguous() for k, v in model.named_parameters() if v.requires_grad}
        save_file(trained, folder / "weights.safetensors")


def refusal(out: Path) -> None:
    """optimizer_in_backward under several processes: the loop's one line, and nothing written."""
    cfg = TrainConfig(optimizer_in_backward=True, max_grad_norm=None, max_steps=1)
    model = torch.nn.Linear(2, 2)
    try:
        train(model, [{}], lambda m, b: (m.weight.sum(), {}), lambda r: {}, cfg, out / "refused-work")
        message = "no error"
    except UserError as error:
        message = str(error)
    (out / f"refusal-rank{rank()}.txt").write_text(message)


def export(models: Path, out: Path) -> None:
    """Every rank saves a model through the runners' staged output; rank 1 arrives a second late, so a rank
    that wrote the output too would leave its file last."""
    if rank() == 1:
        time.sleep(1.0)
    loaded = load_model(models / "tiny", device="cpu")
    with staged_output(out / "export", overwrite=True) as staging:
        save_model(staging, loaded.model, loaded.tokenizer)
        (staging / f"written-by-rank{rank()}").write_text("")


def main() -> None:
    models, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    for case in SETTINGS:
        run_case(case, models, out, processes=2)
    refusal(out)
    export(models, out)
    if torch.distributed.is_initialized():  # a gloo process that exits with its group alive may abort
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
