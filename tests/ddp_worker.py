"""Worker for tests/test_multiprocess.py: trains the tiny llama for a few steps under torchrun (gloo, CPU).

Usage: python -m torch.distributed.run --nproc_per_node N tests/ddp_worker.py OUT_DIR BATCH ACCUM
Rank 0 writes OUT_DIR/history.json and OUT_DIR/weights.safetensors.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmforge.data.chat import render_example
from lmforge.data.packing import collate
from lmforge.models.load import load_model
from lmforge.models.tiny import make_tiny_llama
from lmforge.train.chunked import causal_lm_loss
from lmforge.train.loop import TrainConfig, train


def main() -> None:
    out, batch_size, accum = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    folder = make_tiny_llama(out / f"model-rank{rank}", seed=0)
    loaded = load_model(folder)
    records = [{"prompt": f"Add {a} and {b}.", "completion": str(a + b)} for a in range(4) for b in range(6)]
    rows = []
    for record in records:
        example = render_example(loaded.tokenizer, record)
        rows.append(
            {
                "input_ids": example.input_ids,
                "labels": example.labels,
                "position_ids": list(range(len(example.input_ids))),
            }
        )
    cfg = TrainConfig(lr=1e-2, max_steps=3, batch_size=batch_size, grad_accum=accum, save_every=100)
    history = train(
        loaded.model,
        rows,
        causal_lm_loss,
        lambda b: collate(b, loaded.tokenizer.pad_token_id),
        cfg,
        out / f"work-rank{rank}",
    )
    if torch.distributed.is_initialized():  # a gloo process that exits with its group alive may abort
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if rank == 0:
        (out / "history.json").write_text(json.dumps(history))
        save_file({k: v.detach().contiguous() for k, v in loaded.model.named_parameters()}, out / "weights.safetensors")


if __name__ == "__main__":
    main()
