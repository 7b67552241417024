"""Which process this is, for the code around training that runs on every rank but must write once.

Under `accelerate launch` or `torchrun` every process runs the whole command; the process group exists only
once the loop has built its Accelerator. Before that the launcher's environment (RANK) says which process
this is, so a training command can refuse or clean up before any model loads, on rank 0 alone.
`check_launch` turns a launch that silently started one process where several were asked for into a line.
"""

from __future__ import annotations

import os

import torch.distributed as dist

from lmforge.errors import UserError


def rank() -> int:
    """This process's global rank: the process group's, or the launcher's RANK before one exists."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True on the process that writes (rank 0, or the only one)."""
    return rank() == 0


def wait_for_others() -> None:
    """A barrier when several processes run in a group; nothing otherwise."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def check_launch() -> None:
    """Refuse a launch that asked for several processes but started one.

    `accelerate launch --cpu --num_processes N` (and a config with `distributed_type: MULTI_CPU`) starts
    several CPU processes only through mpirun (`--mpirun_hostfile`); without it accelerate runs the script
    once, setting MASTER_ADDR (only when N > 1) and ACCELERATE_USE_CPU but no WORLD_SIZE, and the run would
    train one process on 1/N of the asked-for global batch without a word.
    """
    env = os.environ
    launched_by_accelerate = "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env
    world = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    if launched_by_accelerate and not any(key in env for key in world):
        raise UserError(
            "accelerate launch asked for several processes but started one (its --cpu/MULTI_CPU mode needs "
            "mpirun): use `accelerate launch --config_file configs/accelerate/ddp_cpu.yaml -m lmforge ...` "
            "or `torchrun --nproc_per_node N -m lmforge ...`"
        )
