"""Worker for tests/test_fsdp2.py: one optimiser step under raw FSDP2 (`fully_shard`, 2-rank CPU gloo mesh).

`torchrun --nproc_per_node 2 tests/fsdp2_worker.py MODELS OUT` runs three cases on every rank, each with the
model preparation of lmforge/train/engines.py: a full fine-tune of a tied-embedding tiny llama, a LoRA
adapter on a tiny llama, and a student distilled from a frozen, sharded teacher. Each rank takes every
other row of the same batch (uneven token counts), so the sharded step must equal one process's step over
the whole batch, which the test computes with `step(..., world=1)` in its own process. Rank 0 writes
OUT/<case>.safetensors (the gathered full state dict) and, for LoRA, OUT/lora_adapter/ (the adapter saved
from the gathered state dict).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from lmforge.data.packing import collate
from lmforge.distill.objectives import Objective
from lmforge.distill.run import Guards
from lmforge.distill.run import make_loss_fn as distill_loss_fn
from lmforge.finetune.lora import LoraSettings, attach_lora
from lmforge.models.load import load_model
from lmforge.train.chunked import causal_lm_loss
from lmforge.train.engines import shard_frozen, shard_model
from lmforge.train.loss_module import LossModule

CASES = ("full", "lora", "teacher")
ROWS = [list(range(5 + 3 * i, 5 + 3 * i + 4 + 5 * (i % 3))) for i in range(6)]  # lengths 4..14, uneven per rank


def batch_rows(rank: int, world: int) -> list[dict]:
    rows = [{"input_ids": ids, "labels": ids, "position_ids": list(range(len(ids)))} for ids in ROWS]
    return rows[rank::world]


def trainable_model(models: Path, case: str) -> torch.nn.Module:
    """The model the case trains, built the same way on every rank and in the reference process."""
    torch.manual_seed(0)
    if case == "full":
        return load_model(models / "tiny_tied", device="cpu").model.requires_grad_(True)
    return attach_lora(load_model(models / "tiny", device="cpu").model, LoraSettings(r=4, alpha=8))


def loss_function(models: Path, case: str, world: int):
    if case != "teacher":
        return causal_lm_loss
    teacher = load_model(models / "tiny_tied", device="cpu").model.requires_grad_(False)
    if world > 1:
        teacher = shard_frozen(teacher)
    vocab = teacher.config.vocab_size
    return distill_loss_fn(teacher, None, [Objective("forward_kl")], vocab, 16, Guards())


def step(models: Path, case: str, rank: int = 0, world: int = 1) -> torch.nn.Module:
    """One AdamW step on the global batch; under `world` > 1 this rank's rows through the sharded model.

    The summed token loss is divided by the global token count; FSDP2 averages gradients over the ranks, so
    each rank's share is multiplied by `world` to give the gradient of the global sum.
    """
    model = trainable_model(models, case)
    loss_fn = loss_function(models, case, world)
    module = LossModule(model, loss_fn)
    if world > 1:
        shard_model(module)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    batch = collate(batch_rows(rank, world), 0)
    total = torch.tensor(sum(len(r) - 1 for r in ROWS), dtype=torch.float32)
    loss_sum, _ = module(batch)
    (loss_sum * world / total).backward()
    optimizer.step()
    return model


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The gathered full state dict (rank 0 holds it; other ranks get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def main(models: Path, out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    for case in CASES:
        model = step(models, case, rank, world)
        state = full_state(model)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in state.items()}, out / f"{case}.safetensors")
            if case == "lora":
                model.save_pretrained(out / "lora_adapter", state_dict=state)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
