"""Which engine trains, at what precision: the `Accelerator` built from the launch and the train config.

`accelerate launch --config_file configs/accelerate/X.yaml` tells each process its engine through
environment variables (ACCELERATE_USE_FSDP + FSDP_VERSION, ACCELERATE_USE_DEEPSPEED + its ZeRO stage);
torchrun gives only the process group (plain DDP). They are read here once, before the Accelerator exists,
because Accelerate itself runs an FSDP or DeepSpeed launch on CPU as plain multi-CPU DDP without a word, and
raises a traceback where DeepSpeed is missing: both are one `UserError` line here, naming the launch config
and the fix. `train.mixed_precision` (auto | no | bf16 | fp16) is resolved for the device the same way, and
the same resolution is written into run.json (`engine_summary`), so a record says what actually ran.
Master weights and optimiser state stay float32 in every mode: Accelerate autocasts the forward (DDP, one
process), FSDP2's MixedPrecisionPolicy keeps the sharded fp32 parameters, DeepSpeed's bf16/fp16 keep fp32
master copies in the optimiser.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import UserError

log = logging.getLogger("lmforge")

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
SHIPPED_CONFIGS = Path("configs/accelerate")


@dataclass(frozen=True)
class Engine:
    """What this process was launched as."""

    name: str
    """single (one process), ddp, fsdp2, zero2 or zero3."""
    processes: int
    """World size of the launch."""

    @property
    def shards_parameters(self) -> bool:
        """Whether a rank holds only a slice of each weight (so every rank must run each forward together)."""
        return self.name in ("fsdp2", "zero3") and self.processes > 1


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "false").strip().lower() in ("1", "true", "yes")


def launch_config_file() -> str:
    """The `--config_file` the user gave `accelerate launch`, read from the launcher's command line (this
    process's parent, or the torchrun elastic agent's parent); a generic description when it is not found."""
    pid = os.getppid()
    for _ in range(2):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            break
        for i, arg in enumerate(argv[:-1]):
            if arg == "--config_file":
                return argv[i + 1]
            if arg.startswith("--config_file="):
                return arg.split("=", 1)[1]
        pid = int(status[1])  # the parent's parent
    return "the accelerate launch config"


def launched_engine(env: Mapping[str, str] | None = None) -> Engine:
    """The engine the launch environment asks for; FSDP1 is refused (lmforge runs FSDP2 only)."""
    env = os.environ if env is None else env
    processes = int(env.get("WORLD_SIZE", "1") or 1)
    if _flag(env, "ACCELERATE_USE_FSDP"):
        if env.get("FSDP_VERSION", "1").strip() != "2":
            raise UserError(
                f"{launch_config_file()} asks for FSDP version {env.get('FSDP_VERSION', '1')}: lmforge runs FSDP2 "
                f"only; set fsdp_config.fsdp_version: 2 (as {SHIPPED_CONFIGS / 'fsdp2.yaml'} does)"
            )
        return Engine("fsdp2", processes)
    if _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        return Engine(f"zero{_zero_stage(env)}", processes)
    return Engine("ddp" if processes > 1 else "single", processes)


def _zero_stage(env: Mapping[str, str]) -> int:
    """ZeRO stage from the launch (zero_stage key), or from the DeepSpeed JSON it names."""
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage:
        return int(stage)
    config_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if config_file and Path(config_file).is_file():
        return int(json.loads(Path(config_file).read_text()).get("zero_optimization", {}).get("stage", 0))
    return 2  # Accelerate's own default


def check_engine(engine: Engine, cuda: bool | None = None) -> None:
    """Refuse, in one line, an engine that cannot run here instead of letting Accelerate fall back silently."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if engine.name in ("single", "ddp"):
        return
    what = "FSDP2" if engine.name == "fsdp2" else f"DeepSpeed ZeRO-{engine.name[-1]}"
    if not cuda or _flag(os.environ, "ACCELERATE_USE_CPU"):
        raise UserError(
            f"{launch_config_file()} asks for {what}, which Accelerate runs on CUDA GPUs only (on CPU it would "
            f"silently run plain DDP): launch with {SHIPPED_CONFIGS / 'ddp_cpu.yaml'} here, or run on GPUs"
        )
    if engine.name.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        raise UserError(
            f"{launch_config_file()} asks for {what}, but deepspeed is not installed: pip install deepspeed, "
            f"or launch with {SHIPPED_CONFIGS / 'fsdp2.yaml'} or {SHIPPED_CONFIGS / 'ddp.yaml'}"
        )


def resolve_mixed_precision(requested: str, device_type: str, bf16_supported: bool) -> str:
    """`train.mixed_precision` for this device: auto is bf16 on a GPU that computes it, no elsewhere; a
    precision the device cannot run is one line naming the key and the fix."""
    if requested not in MIXED_PRECISION:
        raise UserError(f"train.mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {requested!r}")
    if requested == "auto":
        return "bf16" if device_type == "cuda" and bf16_supported else "no"
    if requested == "fp16" and device_type != "cuda":
        raise UserError(
            f"train.mixed_precision: fp16 needs a CUDA GPU (this run is on {device_type}): set it to no or bf16"
        )
    if requested == "bf16" and device_type == "cuda" and not bf16_supported:
        raise UserError(
            "train.mixed_precision: bf16 is not supported by this GPU (compute capability below 8.0): set it "
            "to fp16 or no"
        )
    return requested


def _device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def engine_summary(train: Mapping) -> dict:
    """{engine, processes, mixed_precision} as a run with this `train` config section resolves them here:
    what run.json keeps (the config itself may say auto)."""
    engine = launched_engine()
    precision = resolve_mixed_precision(str(train.get("mixed_precision", "auto")), _device_type(), _bf16_supported())
    return {"engine": engine.name, "processes": engine.processes, "mixed_precision": precision}


def check_run(cfg: Any) -> None:
    """Refuse, before anything loads or is written, a training run whose engine, precision or quantised base
    cannot run here. `cfg` is a training command's config (its `train`, and `method`/`lora` when it has them)."""
    engine = launched_engine()
    signal = getattr(getattr(cfg, "signal", None), "kind", None)
    if signal in ("on_policy", "sequence"):
        refuse_generation_under_sharding(f"signal.kind: {signal}", engine)
    if getattr(getattr(cfg, "rationale", None), "enabled", False):
        refuse_generation_under_sharding("rationale.enabled (the teacher writes rationales)", engine)
    if engine.name.startswith("zero") and cfg.train.grad_accum > 1:
        # Accelerate steps DeepSpeed's engine inside backward unless accumulate() says otherwise, and the loop's
        # micro-batch counts vary by rank (token budget), which accumulate()'s fixed count cannot follow.
        raise UserError(
            f"train.grad_accum: {cfg.train.grad_accum} under DeepSpeed ({launch_config_file()}): lmforge accumulates "
            "through DeepSpeed's engine only one micro-batch per step; set train.grad_accum: 1 and raise "
            f"train.batch_size, or launch with {SHIPPED_CONFIGS / 'fsdp2.yaml'} or {SHIPPED_CONFIGS / 'ddp.yaml'}"
        )
    check_engine(engine)
    resolve_mixed_precision(cfg.train.mixed_precision, _device_type(), _bf16_supported())
    quantize = getattr(getattr(cfg, "lora", None), "quantize", None)
    if quantize and hasattr(cfg, "teacher"):
        raise UserError(f"lora.quantize: {quantize} is for finetune, dpo and tune; a distilled student trains in float")
    if quantize and getattr(cfg, "method", "lora") != "lora":
        raise UserError(f"lora.quantize: {quantize} needs method: lora (a quantised base cannot train whole)")
    if quantize:
        from lmforge.models.quantize import check_backend

        check_backend(quantize, _device_type())


def make_accelerator(
    mixed_precision: str = "auto",
    *,
    batch_size: int | None = None,
    max_grad_norm: float | None = None,
    **accelerator_kwargs,
):
    """The Accelerator for this launch and `train.mixed_precision`, after refusing what cannot run here.

    Args:
        mixed_precision: TrainConfig.mixed_precision (auto | no | bf16 | fp16).
        batch_size, max_grad_norm: TrainConfig's, written into a DeepSpeed launch's config (DeepSpeed reads
            its micro-batch size from a DataLoader, which the loop does not use, and clips by itself).
        accelerator_kwargs: passed on (gradient_accumulation_steps, ...).
    Returns:
        accelerate.Accelerator; its `mixed_precision` is the resolved precision.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    engine = launched_engine()
    check_engine(engine)
    precision = resolve_mixed_precision(mixed_precision, _device_type(), _bf16_supported())
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, precision):
        # One process that trains several times (tune trials, tests) at different precisions: Accelerate keeps
        # the first precision process-wide and refuses a second, so its state is rebuilt (the process group,
        # held by PartialState, is kept).
        AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=_device_type() == "cpu", mixed_precision=precision, **accelerator_kwargs)
    if engine.name.startswith("zero"):
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        if batch_size is not None:
            ds_config["train_micro_batch_size_per_gpu"] = batch_size
        ds_config["gradient_clipping"] = max_grad_norm or 0.0  # 0: DeepSpeed does not clip
    return accelerator


def refuse_generation_under_sharding(what: str, engine: Engine | None = None) -> None:
    """Generation (on-policy samples, teacher-written targets) is refused where weights are sharded over
    several processes: each rank would have to run every decoding step in lockstep with the others, which
    `generate` does not do (a rank that stops early leaves the others waiting forever)."""
    engine = launched_engine() if engine is None else engine
    if engine.shards_parameters:
        raise UserError(
            f"{what} generates text, which lmforge does not run with weights sharded over {engine.processes} "
            f"processes ({engine.name}): use signal.kind: offline or cached, or launch with "
            f"{SHIPPED_CONFIGS / 'ddp.yaml'} or {SHIPPED_CONFIGS / 'zero2.yaml'}"
        )


def prepare_frozen(model: torch.nn.Module, accelerator) -> torch.nn.Module:
    """A frozen model (DPO reference, distillation teacher) made ready for the engine in use, in eval mode.

    FSDP2 with several processes: `shard_frozen` on the training mesh (each rank holds a slice of each decoder
    layer). DDP, one process and ZeRO: the model itself on the device, whole on every rank. Under ZeRO-3 a
    frozen model is not partitioned: the chunked losses read the head's weight and call the decoder outside
    the model's forward, and stage 3 releases a module's gathered weights after each submodule's forward, so
    the head would be read as its empty partition (FSDP2 can keep its root group gathered; DeepSpeed's hooks
    offer no such hold). A teacher too big to sit whole beside the student uses the cached top-k signal.
    """
    model.requires_grad_(False).eval()
    engine = launched_engine()
    if engine.name == "fsdp2" and engine.processes > 1:
        return shard_frozen(model, accelerator.torch_device_mesh)
    if engine.name == "zero3":
        log.info("ZeRO-3: the frozen model stays whole on each process (signal.kind: cached keeps it out of memory)")
    return model.to(accelerator.device)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one: modules whose class a transformers model inside `model` names
    in its `_no_split_modules` (LlamaDecoderLayer, ...); found through wrappers (PEFT, a loss module)."""
    names = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or [])}
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_frozen(model: torch.nn.Module, mesh=None) -> torch.nn.Module:
    """`shard_model` for a model that only gives signals: the decoder layers (nearly all the weights) stay
    sharded and are gathered one at a time as they run, while the root group (embeddings, final norm, head) is
    gathered once and kept whole. The losses read the head's weight and call the decoder directly, outside the
    root's forward, where FSDP would otherwise gather it; a frozen model never needs it resharded."""
    shard_model(model, mesh)
    model.unshard()
    return model


def shard_model(model: torch.nn.Module, mesh=None) -> torch.nn.Module:
    """`fully_shard` each decoder layer, then the root (embeddings, final norm, head: a tied head stays one
    parameter in the root's group). The module is sharded in place and returned."""
    from torch.distributed.fsdp import fully_shard

    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        device = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(device, (torch.distributed.get_world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
