"""The one training loop: a loss function in, a trained model and its history out [nG train.py].

SFT, DPO and distillation differ only in `loss_fn(model, batch) -> (summed loss, metrics)` and in their
rows. The loop owns what every method needs: seeded data order, gradient accumulation with the loss
normalised by the token count of the whole optimiser step (so batch 1 x accumulation 8 equals batch 8 x
accumulation 1, and N processes equal one), warmup + cosine/linear schedule, gradient clipping, evaluation
every N steps with early stopping and best-checkpoint keeping, resumable checkpoints (Ctrl-C saves one),
and a JSONL log. It runs on `accelerate.Accelerator`: `accelerator.prepare` wraps the model and its loss as
one module (train/loss_module.py) for the launched engine, so `accelerate launch` / `torchrun` scale it out.
Under several processes the loop is its own distributed sampler: every process draws the same seeded order
and takes rows r, r+N, r+2N... of each optimiser step's global rows, so ranks see disjoint rows, the global
step is the one a single process would take, and the data cursor resumes exactly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import broadcast_object_list, gather_object
from safetensors import safe_open
from safetensors.torch import save_file

from lmforge import config as config_io
from lmforge.errors import UserError
from lmforge.models.compat import checkpointing_rename_quiet
from lmforge.train.allocator import return_freed_memory_to_os
from lmforge.train.engines import make_accelerator
from lmforge.train.in_backward import StepInBackward
from lmforge.train.loss_module import LossFn, LossModule
from lmforge.train.ranks import check_launch
from lmforge.train.tied import densify_gradients, lean_tied_embedding

log = logging.getLogger("lmforge")
Collate = Callable[[list[dict]], dict]
# Padded tokens per forward pass on CPU (TrainConfig.micro_batch_tokens); docs/benchmarks.md has the measurement.
CPU_MICRO_BATCH_TOKENS = 512
EvalFn = Callable[[torch.nn.Module], dict]


@dataclass(frozen=True)
class TrainConfig:
    """How to optimise: the knobs every method shares."""

    lr: float = 2e-4
    """Peak learning rate (after warmup)."""
    max_steps: int = 100
    """Optimiser steps to run."""
    batch_size: int = 8
    """Rows per micro-batch (per process); on CPU a micro-batch is split further by micro_batch_tokens."""
    grad_accum: int = 1
    """Micro-batches per optimiser step."""
    micro_batch_tokens: int | None = None
    """Split a micro-batch whose padded tokens exceed this into equal parts run one after another: the same
    update (the loss is divided by the step's tokens), less activation memory. None: 512 on CPU, where
    throughput is flat above a few hundred tokens per forward, and no split on GPU; 0: never split."""
    warmup_steps: int = 0
    """Linear warmup from 0 to `lr` over this many steps."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup (to 0 at max_steps for cosine and linear)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value (None: no clipping)."""
    eval_every: int = 0
    """Evaluate every N steps (0: only at the end)."""
    patience: int | None = None
    """Stop after this many evaluations without improvement (None: never stop early)."""
    save_every: int = 50
    """Write a resumable checkpoint every N steps."""
    seed: int = 0
    """Seeds the data order and every random draw."""
    release_memory: bool = False
    """Fix glibc's malloc thresholds so freed activation buffers go back to the OS (train/allocator.py): lower
    peak RSS on unsplit large batches, at a page-fault cost in speed. The token budget above saves nearly as much
    at no speed cost."""
    optimizer_in_backward: bool = False
    """Step AdamW on each parameter as soon as its gradient is complete and free the gradient then
    (train/in_backward.py): full fine-tuning no longer holds a model-sized gradient. Same AdamW update, but no
    global-norm clipping, so it needs max_grad_norm: null, grad_accum 1, micro_batch_tokens 0 or unset (the
    batch runs in one pass) and one process."""
    gradient_checkpointing: bool = False
    """Keep only each decoder layer's input during forward and recompute the rest in backward: activation
    memory drops to about one layer's, for about one more forward pass of compute. The update is the same."""
    tensorboard: bool = False
    """Also write the log as TensorBoard scalars to work_dir/tensorboard (needs `pip install tensorboard`)."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16", False] = "auto"
    """Forward/backward precision (train/engines.py): auto is bf16 on a GPU that computes it and no (float32)
    elsewhere; fp16 needs a CUDA GPU. Master weights and optimiser state stay float32; run.json keeps the
    precision used. YAML's bare `no` reads as false, which means no."""

    def __post_init__(self) -> None:
        """Refuse, when the config is read (before any model loads), values no run can use and what
        optimizer_in_backward cannot honour."""
        if self.mixed_precision is False:
            object.__setattr__(self, "mixed_precision", "no")
        config_io.above(self, "lr", 0)
        for name in ("max_steps", "batch_size", "grad_accum", "save_every"):
            config_io.at_least(self, name, 1)
        for name in ("micro_batch_tokens", "warmup_steps", "weight_decay", "eval_every"):
            config_io.at_least(self, name, 0)
        config_io.above(self, "max_grad_norm", 0)
        config_io.at_least(self, "patience", 1)
        if not self.optimizer_in_backward:
            return
        refused = {
            "max_grad_norm": (self.max_grad_norm is not None, "null (the global norm is known only after every step)"),
            "grad_accum": (self.grad_accum != 1, "1 (each backward pass steps the weights)"),
            "micro_batch_tokens": (bool(self.micro_batch_tokens), "0 or unset (the batch must run in one pass)"),
        }
        for key, (bad, fix) in refused.items():
            if bad:
                raise UserError(
                    f"train.optimizer_in_backward cannot run with train.{key}={getattr(self, key)}: set it to {fix}"
                )


@dataclass
class TrainState:
    """What a checkpoint must restore besides weights and optimiser."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_gain: int = 0
    processes: int = 1
    """How many processes took the steps: a resume must run as many (each step's global rows depend on it)."""


def learning_rate_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak learning rate at optimiser step `step` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def epoch_order(n_rows: int, seed: int, epoch: int) -> list[int]:
    """The row order of one epoch: a seeded shuffle, the same on every process and after a resume."""
    order = list(range(n_rows))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


def _next_micro_batches(
    rows: Sequence[dict], cfg: TrainConfig, state: TrainState, rank: int, world: int, token_budget: int = 0
):
    """The rows of one optimiser step for this process, advancing the epoch/position cursor."""
    per_step = cfg.batch_size * cfg.grad_accum * world
    taken: list[dict] = []
    while len(taken) < per_step:
        order = epoch_order(len(rows), cfg.seed, state.epoch)
        need = per_step - len(taken)
        chunk = order[state.position : state.position + need]
        taken += [rows[i] for i in chunk]
        state.position += len(chunk)
        if state.position >= len(rows):
            state.epoch, state.position = state.epoch + 1, 0
    mine = taken[rank::world]  # every process sees a disjoint slice of the same global step
    batches = [mine[i : i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
    return [part for batch in batches for part in split_by_tokens(batch, token_budget)]


def row_tokens(row: dict) -> int:
    """Tokens a row puts in a batch: its input ids (a preference pair's two sides together)."""
    return sum(len(v) for k, v in row.items() if k.endswith("input_ids") and isinstance(v, list))


def split_by_tokens(batch: list[dict], budget: int) -> list[list[dict]]:
    """`batch` in the fewest equal-sized parts whose padded size (rows x longest row) fits `budget` tokens;
    one row per part at least. A budget of 0 keeps the batch whole."""
    longest = max((row_tokens(r) for r in batch), default=0)
    if budget <= 0 or longest * len(batch) <= budget:
        return [batch]
    parts = math.ceil(len(batch) / max(1, budget // longest))
    size = math.ceil(len(batch) / parts)
    return [batch[i : i + size] for i in range(0, len(batch), size)]


def loss_units(batch: dict) -> int:
    """What the step's summed loss is divided by: labelled tokens, or `num_items` when the batch says so
    (DPO counts preference pairs, not tokens)."""
    if "num_items" in batch:
        return int(batch["num_items"])
    return int((batch["labels"] != -100).sum())


def tokens_seen(history: list[dict]) -> int:
    """Input tokens the steps of a history read (padding excluded), for run.json."""
    return sum(h.get("input_tokens", 0) for h in history if "loss" in h)


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def trainable_weights(accelerator: Accelerator, wrapped: torch.nn.Module, model: torch.nn.Module) -> dict:
    """The trainable weights, whole, as CPU tensors named as in `model`. Call it on every process: under a
    sharding engine `accelerator.get_state_dict` gathers the shards (under DDP it only unwraps)."""
    full = accelerator.get_state_dict(wrapped)  # the LossModule's state: the model's keys under "model."
    return {name: full[f"model.{name}"].detach().contiguous().cpu() for name in _trainable(model)}


def save_checkpoint(folder: Path, weights: dict, optimizer, state: TrainState, rng_states: list) -> None:
    """Trainable weights (safetensors), optimiser state, loop state and every process's RNG: enough to resume
    exactly. Only the main process calls it; staged in `<folder>.partial` and renamed into place."""
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(weights, staging / "trainable.safetensors")
    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    torch.save({"torch": rng_states[0], "torch_by_rank": rng_states}, staging / "rng.pt")
    (staging / "state.json").write_text(json.dumps(asdict(state)))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


def load_trainable(model: torch.nn.Module, file: Path) -> None:
    """Copy saved trainable tensors (a checkpoint's or the best evaluation's) back into the model, one tensor
    at a time (loading the whole file first would hold a second copy of the trained weights)."""
    params = _trainable(model)
    with safe_open(file, framework="pt") as saved:
        names = set(saved.keys())
        missing, extra = sorted(set(params) - names), sorted(names - set(params))
        if missing or extra:
            raise UserError(
                f"{file} does not fit this run's trained parameters (missing {missing[:3]}, extra {extra[:3]}): "
                "train the same parameters as the interrupted run, or start without resume"
            )
        with torch.no_grad():
            for name in names:
                params[name].copy_(saved.get_tensor(name))


def restore_best(model: torch.nn.Module, work_dir: str | Path) -> bool:
    """Load the best evaluation's weights kept by `train` into the model; False when none were kept."""
    best = Path(work_dir) / "best" / "trainable.safetensors"
    if best.is_file():
        load_trainable(model, best)
    return best.is_file()


def load_checkpoint(folder: Path, model, optimizer, rank: int = 0, processes: int = 1) -> TrainState:
    """Restore what save_checkpoint wrote, on every process (pickles only with weights_only=True)."""
    state = TrainState(**json.loads((folder / "state.json").read_text()))
    if state.processes != processes:
        raise UserError(
            f"{folder} was written by {state.processes} process(es), this run has {processes}: resume with "
            f"{state.processes} (a step's global batch is per-process rows x processes), or start over"
        )
    load_trainable(model, folder / "trainable.safetensors")
    try:
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    except (KeyError, ValueError) as error:  # the interrupted run trained other parameters
        raise UserError(
            f"{folder / 'optimizer.pt'} does not fit this run's optimiser ({error}): train the same parameters "
            "as the interrupted run, or start without resume"
        ) from None
    rng = torch.load(folder / "rng.pt", weights_only=True)
    by_rank = rng.get("torch_by_rank") or [rng["torch"]]
    # Ctrl-C under several processes saves rank 0's generator only (no collective while interrupted)
    torch.set_rng_state(by_rank[rank] if rank < len(by_rank) else by_rank[0])
    return state


def train(
    model: torch.nn.Module,
    rows: Sequence[dict],
    loss_fn: LossFn,
    collate: Collate,
    cfg: TrainConfig,
    work_dir: str | Path,
    evaluate: EvalFn | None = None,
    higher_is_better: bool = False,
    resume: bool = False,
    on_log: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Optimise the trainable parameters of `model` on `rows`; return one log record per step and eval.

    Every process of a launch calls it with the same arguments; the model is trained in place (the same
    weights on every process at the end) and only the main process writes the log and checkpoints.

    Args:
        model: the module; only parameters with requires_grad are optimised and checkpointed.
        rows: training rows, each turned into a micro-batch by `collate`.
        loss_fn: (model, batch) -> (loss summed over the batch's tokens, {"tokens": n, ...}); it runs inside
            the forward of a LossModule holding `model`, which is what the engine wraps.
        collate: list of rows -> batch dict of tensors; the batch holds "labels" (-100 = no loss) or
            "num_items" (the loss units it holds; see loss_units).
        cfg: optimisation settings.
        work_dir: holds `checkpoint/` (resumable), `best/` (best trainable weights) and `log.jsonl`.
        evaluate: model -> {"metric": value, ...}; the first entry decides "best" and early stopping.
        higher_is_better: direction of evaluate's first metric (loss: False; accuracy: True).
        resume: continue from work_dir/checkpoint when it exists.
        on_log: called with every log record (progress display).
    """
    work_dir = Path(work_dir)
    check_launch()
    if cfg.release_memory:
        return_freed_memory_to_os()
    # Buffers (rotary tables) are the same on every process: no broadcast at each forward, which would also
    # be a collective that ranks with different micro-batch counts call a different number of times.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    accelerator = make_accelerator(  # refuses what cannot run here; DeepSpeed reads the batch size and clipping
        cfg.mixed_precision, batch_size=cfg.batch_size, max_grad_norm=cfg.max_grad_norm, kwargs_handlers=[ddp]
    )
    world = accelerator.num_processes
    torch.manual_seed(cfg.seed)
    if cfg.optimizer_in_backward and world != 1:
        raise UserError(f"train.optimizer_in_backward runs in one process, not {world}: launch one, or turn it off")
    work_dir.mkdir(parents=True, exist_ok=True)
    optimizer = _optimizer(list(_trainable(model).values()), cfg)
    with warnings.catch_warnings():  # torch renames broadcast_buffers; Accelerate's kwargs know the old name only
        warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
        if isinstance(optimizer, StepInBackward):  # one process (above): its hooks need no engine
            wrapped = accelerator.prepare(LossModule(model, loss_fn))
        else:
            wrapped, optimizer = accelerator.prepare(LossModule(model, loss_fn), optimizer)
    model = accelerator.unwrap_model(wrapped).model  # the same module, its parameters as the engine left them
    params = [p for p in wrapped.parameters() if p.requires_grad]
    token_budget = cfg.micro_batch_tokens
    if token_budget is None:
        token_budget = (
            CPU_MICRO_BATCH_TOKENS if accelerator.device.type == "cpu" and not cfg.optimizer_in_backward else 0
        )
    state = TrainState(processes=world)
    checkpoint = work_dir / "checkpoint"
    if resume and (checkpoint / "state.json").is_file():
        state = load_checkpoint(checkpoint, model, optimizer, accelerator.process_index, world)
        log.info("resuming from step %d of %d (%s)", state.step, cfg.max_steps, checkpoint)
    elif resume:
        log.info("nothing to resume in %s: starting from step 0", work_dir)
    log_path = work_dir / "log.jsonl"
    history: list[dict] = []

    board = _tensorboard(work_dir) if cfg.tensorboard and accelerator.is_main_process else None

    def record(entry: dict) -> None:
        history.append(entry)
        if accelerator.is_main_process:
            with open(log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")
            if board is not None:
                scalars = entry.get("eval", entry)
                for name, value in scalars.items():
                    if isinstance(value, int | float) and name != "step":
                        board.add_scalar(("eval/" if "eval" in entry else "train/") + name, value, entry["step"])
            if on_log:
                on_log(entry)

    def save(interrupted: bool = False) -> None:
        """Every process gathers (weights, RNG), the main one writes; interrupted, the main one alone."""
        if interrupted:
            weights = {k: v.detach().contiguous().cpu() for k, v in _trainable(model).items()}
            rng_states = [torch.get_rng_state()]
        else:
            weights = trainable_weights(accelerator, wrapped, model)
            rng_states = gather_object([torch.get_rng_state()]) if world > 1 else [torch.get_rng_state()]
        if accelerator.is_main_process:
            save_checkpoint(checkpoint, weights, optimizer, state, rng_states)
        if not interrupted:
            accelerator.wait_for_everyone()  # nobody reads work_dir (restore_best, the runner) before it is whole

    model.train()
    started, mid_step = time.perf_counter(), False
    scope = ExitStack()  # closed in `finally`, also when entering a context fails
    try:
        scope.enter_context(lean_tied_embedding(model))
        if cfg.gradient_checkpointing:
            scope.enter_context(_checkpointed(model))
        if isinstance(optimizer, StepInBackward):
            scope.enter_context(optimizer.hooked())
        while state.step < cfg.max_steps:
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * learning_rate_factor(state.step, cfg)
            micro = [
                collate(b)
                for b in _next_micro_batches(rows, cfg, state, accelerator.process_index, world, token_budget)
            ]
            local_tokens = sum(loss_units(b) for b in micro)
            local_inputs = sum(
                int(b["attention_mask"].sum()) if "attention_mask" in b else b["labels"].numel() for b in micro
            )
            total_tokens = int(accelerator.reduce(torch.tensor(local_tokens, device=accelerator.device), "sum"))
            if total_tokens == 0:
                raise ValueError("a training step has no trainable tokens: check the data's loss mask")
            step_loss, mid_step = 0.0, True  # from here to the step count, weights may be half stepped
            for index, batch in enumerate(micro):
                batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                # Gradients are averaged over processes once, in the backward of this process's last
                # micro-batch (ranks may run different counts: token-budget splits); the loss is scaled by the
                # process count so the average is the global step's sum over its total units.
                last = index == len(micro) - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(wrapped):
                    loss_sum, _ = wrapped(batch)
                    accelerator.backward(loss_sum / total_tokens * world)
                step_loss += loss_sum.item()
            densify_gradients(params)
            grad_norm = None
            if isinstance(optimizer, StepInBackward):
                grad_norm = optimizer.take_grad_norm()
            elif cfg.max_grad_norm is not None:
                grad_norm = float(accelerator.clip_grad_norm_(params, cfg.max_grad_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step, mid_step = state.step + 1, False
            loss_total = float(accelerator.reduce(torch.tensor(step_loss, device=accelerator.device), "sum"))
            elapsed = time.perf_counter() - started
            record(
                {
                    "step": state.step,
                    "loss": loss_total / total_tokens,
                    "tokens": total_tokens,
                    "input_tokens": int(
                        accelerator.reduce(torch.tensor(local_inputs, device=accelerator.device), "sum")
                    ),
                    "lr": optimizer.param_groups[0]["lr"],
                    "grad_norm": grad_norm,
                    "elapsed_s": round(elapsed, 3),
                }
            )
            last = state.step == cfg.max_steps
            due = evaluate is not None and ((cfg.eval_every and state.step % cfg.eval_every == 0) or last)
            if due and _evaluate_and_keep_best(
                model, evaluate, higher_is_better, cfg, state, work_dir, record, accelerator, wrapped
            ):
                break
            if state.step % cfg.save_every == 0:
                save()
    except KeyboardInterrupt:
        if mid_step and isinstance(optimizer, StepInBackward):  # some weights took this step, others not
            log.warning(
                "interrupted inside an optimiser step taken in backward: resume starts at the last checkpoint, %s",
                checkpoint,
            )
        elif accelerator.is_main_process:
            save(interrupted=True)
            log.warning(
                "interrupted after step %d of %d: checkpoint saved in %s", state.step, cfg.max_steps, checkpoint
            )
        raise
    finally:
        scope.close()
        if board is not None:
            board.close()  # flushes: the writer's background thread may still hold the last scalars
    save()
    model.eval()
    return history


def _optimizer(params: list[torch.Tensor], cfg: TrainConfig):
    """AdamW over the trainable parameters, whole or stepped one parameter at a time in backward."""
    # fused: one kernel per tensor, no temporaries (the loop's version makes a parameter-sized one per step)
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)

    def adamw(group: list[torch.Tensor]) -> torch.optim.AdamW:
        return torch.optim.AdamW(
            group, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), fused=fused or None
        )

    return StepInBackward(params, adamw) if cfg.optimizer_in_backward else adamw(params)


@contextmanager
def _checkpointed(model: torch.nn.Module) -> Iterator[None]:
    """Activation checkpointing per decoder layer while training (transformers' own, non-reentrant)."""
    try:  # transformers (and PEFT, which passes it on) decides which models support it
        with checkpointing_rename_quiet():
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    except (ValueError, AttributeError) as error:
        raise UserError(
            f"{type(model).__name__} does not support train.gradient_checkpointing ({error}): set it to false"
        ) from None
    try:
        yield
    finally:
        with checkpointing_rename_quiet():
            model.gradient_checkpointing_disable()


def _tensorboard(work_dir: Path):
    """A SummaryWriter, or one clear line saying how to get one."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("train.tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(work_dir / "tensorboard"))


def _evaluate_and_keep_best(
    model, evaluate, higher_is_better, cfg, state, work_dir, record, accelerator, wrapped
) -> bool:
    """Run `evaluate`, keep the best trainable weights, and say whether patience has run out."""
    model.eval()
    with torch.no_grad():
        metrics = evaluate(model)
    model.train()
    if accelerator.num_processes > 1:  # every process decides "best" and stops as the main one does
        metrics = broadcast_object_list([metrics])[0]
    value = next(iter(metrics.values()))
    improved = state.best_metric is None or (
        value > state.best_metric if higher_is_better else value < state.best_metric
    )
    if improved:
        state.best_metric, state.best_step, state.evals_without_gain = value, state.step, 0
        weights = trainable_weights(accelerator, wrapped, model)
        if accelerator.is_main_process:
            (work_dir / "best").mkdir(exist_ok=True)
            save_file(weights, work_dir / "best" / "trainable.safetensors.partial")
            (work_dir / "best" / "trainable.safetensors.partial").rename(work_dir / "best" / "trainable.safetensors")
    else:
        state.evals_without_gain += 1
    record({"step": state.step, "eval": metrics, "best_step": state.best_step})
    return cfg.patience is not None and state.evals_without_gain >= cfg.patience
