"""`lmforge moe`: a mixture of experts from dense fine-tunes, read from mergekit-moe's YAML unchanged.

Reads top to bottom: parse and check the config (every mistake is one line, before anything is loaded or
written), compute the router rows (moe_router.py), then stream the output tensor by tensor into a staging
folder: attention, norms and embeddings from `base_model`, each expert's MLP as one expert per layer, the
router rows as `mlp.gate`. Mixtral layout (transformers' fused `experts.gate_up_proj` [E, 2I, H] and
`experts.down_proj` [E, H, I], what mergekit 0.1.5 writes) for llama/mistral experts; Qwen2-MoE (per-expert
tensors plus a `shared_expert` and its gate) when one shared expert is given. The folder also gets
config.json, the tokenizer, lmforge.yaml (the config: mergekit-moe runs it too), run.json and a model card.
Semantics follow mergekit-moe 0.1.5 [mk moe/mixtral.py, moe/qwen.py]; the code is lmforge's own.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge import config as config_io
from lmforge.errors import UserError
from lmforge.merge import moe_router, moe_training
from lmforge.merge.safetensors_io import TensorInfo, index_folder, plan_shards, read_rows, write_at
from lmforge.models.load import resolve_model
from lmforge.outputs import CardTable, model_card, staged_output, write_run_files
from lmforge.report.record import RunMeter, run_record

log = logging.getLogger("lmforge.moe")

MLP_PARTS = ("gate_proj", "up_proj", "down_proj")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ARCHITECTURES = {"mixtral": ("llama", "mistral"), "qwen": ("llama", "mistral", "qwen2")}


@dataclass(frozen=True)
class Expert:
    """One dense model whose MLPs become one expert in every layer [mk moe/config.py `Expert`]."""

    source_model: str
    """Model reference: a folder, a hub id or `default`."""
    positive_prompts: list[str] | None = None
    """Prompts that should go to this expert (required unless gate_mode is random)."""
    negative_prompts: list[str] | None = None
    """Prompts that should not: their mean state is subtracted."""
    noise_scale: float | None = None
    """Standard deviation of Gaussian noise added to the expert's MLP weights."""
    residual_scale: float | None = None
    """Factor on the expert's down_proj (its contribution to the residual stream)."""


@dataclass(frozen=True)
class MoEConfig:
    """mergekit-moe's `MoEMergeConfig`, key for key, plus lmforge's routing check."""

    base_model: str
    """Model whose attention, norms and embeddings the MoE keeps; its hidden states place the routers."""
    experts: list[Expert]
    """The routed experts, in output order."""
    gate_mode: str = "hidden"
    """hidden | cheap_embed | random | uniform_random (mergekit), hidden_mlp | ridge (lmforge, moe_router.py)."""
    dtype: str | None = None
    """Output dtype; default: the base model's."""
    experts_per_token: int = 2
    """Experts each token is sent to (top-k of the router)."""
    shared_experts: list[Expert] | None = None
    """One expert every token goes through (Qwen2-MoE output only)."""
    architecture: str | None = None
    """mixtral | qwen; default: mixtral without shared experts, qwen with one."""
    routing_tasks: list[str] | None = None
    """lmforge only: one built-in task (or task .jsonl) per expert; run.json then records the share of each
    task's tokens that the MoE sends to its expert (routing accuracy)."""
    routing_limit: int = 30
    """lmforge only: test records per routing task."""
    train_router: moe_training.RouterTraining | None = None
    """lmforge only: train the routers for a few steps after the build (moe_training.py); default off."""


@dataclass(frozen=True)
class Source:
    """A resolved input model: its reference, folder, config.json and tensor index."""

    ref: str
    folder: Path
    config: dict
    index: dict[str, TensorInfo]


def read_config(config: str | Path | Mapping[str, Any]) -> tuple[MoEConfig, dict]:
    """The checked config and the raw mapping it came from (written back as lmforge.yaml)."""
    where = str(config) if isinstance(config, str | Path) else "config"
    raw = config_io.read_yaml(Path(config)) if isinstance(config, str | Path) else dict(config)
    return config_io.from_dict(raw, MoEConfig, where), raw


def check(cfg: MoEConfig, where: str = "config", allow_all_same: bool = False) -> str:
    """Refuse what mergekit-moe refuses (and what it would crash on), one line each; returns the architecture."""
    count = len(cfg.experts)
    if not count:
        raise UserError(f"{where}: experts is empty: list at least two experts, each with a source_model")
    if cfg.experts_per_token < 1 or cfg.experts_per_token > count:
        raise UserError(
            f"{where}: experts_per_token {cfg.experts_per_token} must be between 1 and the number of experts "
            f"({count}): lower it or add experts"
        )
    modes = moe_router.MERGEKIT_MODES + moe_router.LMFORGE_MODES
    if cfg.gate_mode not in modes:
        raise UserError(f"{where}: gate_mode '{cfg.gate_mode}' is unknown: use one of {', '.join(modes)}")
    shared = cfg.shared_experts or []
    arch = (cfg.architecture or ("qwen" if shared else "mixtral")).lower()
    found = [name for name in ARCHITECTURES if name.startswith(arch) or arch.startswith(name)]
    if not found:
        raise UserError(f"{where}: architecture '{cfg.architecture}' is not supported: use mixtral or qwen")
    arch = found[0]
    if arch == "mixtral" and shared:
        raise UserError(f"{where}: Mixtral has no shared experts: drop shared_experts or set architecture: qwen")
    if arch == "qwen" and len(shared) != 1:
        raise UserError(
            f"{where}: the Qwen2-MoE output needs exactly one shared expert (shared_experts has {len(shared)})"
        )
    if cfg.gate_mode in moe_router.PROMPT_MODES:
        for label, expert in [(f"experts[{i}]", e) for i, e in enumerate(cfg.experts)] + [
            (f"shared_experts[{i}]", e) for i, e in enumerate(shared)
        ]:
            if not expert.positive_prompts:
                raise UserError(
                    f"{where}: {label} ({expert.source_model}) has no positive_prompts, which gate_mode "
                    f"'{cfg.gate_mode}' needs: add prompts that should go to it, or use gate_mode: random"
                )
        prompts = {(tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ())) for e in cfg.experts}
        if count > 1 and len(prompts) == 1:
            raise UserError(
                f"{where}: every expert has the same prompts, so routing cannot tell them apart: give each its own"
            )
    if count > 1 and len({e.source_model for e in cfg.experts}) == 1 and not allow_all_same:
        raise UserError(
            f"{where}: every expert is {cfg.experts[0].source_model}: the MoE would cost more and answer the same; "
            "pass --i-understand-this-is-not-useful-without-training to build it anyway"
        )
    if cfg.routing_tasks is not None and len(cfg.routing_tasks) != count:
        raise UserError(
            f"{where}: routing_tasks names {len(cfg.routing_tasks)} tasks for {count} experts: give one per expert"
        )
    if cfg.dtype is not None and cfg.dtype not in DTYPES:
        raise UserError(f"{where}: dtype '{cfg.dtype}' is unknown: use one of {', '.join(DTYPES)}")
    moe_training.check(cfg, where)
    return arch


def open_source(ref: str) -> Source:
    folder = resolve_model(ref)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"{folder} has no config.json: a MoE expert must be a full model folder (merge adapters first)")
    return Source(ref, folder, json.loads(config_file.read_text(encoding="utf-8")), index_folder(folder))


def check_sources(base: Source, experts: list[Source], arch: str, where: str) -> int:
    """Every expert must be the base's architecture with the same MLP tensors; returns the layer count."""
    kind = base.config.get("model_type")
    if kind not in ARCHITECTURES[arch]:
        raise UserError(
            f"{where}: base_model {base.ref} is a '{kind}' model; the {arch} output takes "
            f"{' or '.join(ARCHITECTURES[arch])} models"
        )
    layers = int(base.config["num_hidden_layers"])
    for source in experts:
        if source.config.get("model_type") != kind:
            raise UserError(
                f"{where}: expert {source.ref} is a '{source.config.get('model_type')}' model and base_model "
                f"{base.ref} a '{kind}' one: every expert must share the base's architecture"
            )
        for name in mlp_names(layers):
            mine, theirs = source.index.get(name), base.index.get(name)
            if theirs is None:
                raise UserError(f"{where}: base_model {base.ref} has no tensor {name}: is it a {kind} checkpoint?")
            if mine is None or mine.shape != theirs.shape:
                got = "no such tensor" if mine is None else f"shape {list(mine.shape)}"
                raise UserError(
                    f"{where}: expert {source.ref}: {name} has {got}, base_model {base.ref} "
                    f"{list(theirs.shape)}: experts must be fine-tunes of the same model size"
                )
    return layers


def mlp_names(layers: int) -> list[str]:
    return [f"model.layers.{i}.mlp.{part}.weight" for i in range(layers) for part in MLP_PARTS]


def moe(
    config: str | Path | Mapping[str, Any],
    out: str | Path,
    overwrite: bool = False,
    seed: int = 0,
    device: str = "cpu",
    allow_all_same: bool = False,
) -> Path:
    """Build a mixture-of-experts model from a mergekit-moe config.

    Args:
        config: mergekit-moe YAML path, or the same keys as a mapping.
        out: output folder (staged, then renamed into place).
        overwrite: replace an existing output folder.
        seed: seed of the random gate modes and of noise_scale.
        device: where the hidden-state pass runs (cpu, cuda).
        allow_all_same: build even when every expert is the same model.
    Returns:
        The output folder.
    """
    meter = RunMeter()
    cfg, raw = read_config(config)
    where = str(config) if isinstance(config, str | Path) else "config"
    out = Path(out)
    arch = check(cfg, where, allow_all_same)
    if out.exists() and not overwrite:
        raise UserError(f"output folder {out} exists: pass --overwrite or choose another folder")
    base = open_source(cfg.base_model)
    refs = [e.source_model for e in cfg.experts + (cfg.shared_experts or [])]
    opened = {ref: open_source(ref) for ref in dict.fromkeys(refs) if ref != cfg.base_model} | {cfg.base_model: base}
    layers = check_sources(base, [opened[r] for r in refs], arch, where)
    hidden = int(base.config["hidden_size"])
    all_experts = cfg.experts + (cfg.shared_experts or [])
    groups = [(e.positive_prompts or [], e.negative_prompts or []) for e in all_experts]
    rows = moe_router.gate_rows(cfg.gate_mode, base.folder, groups, layers, hidden, seed=seed, device=device)
    degenerate = moe_router.warn_degenerate(rows) if cfg.gate_mode in moe_router.AVERAGED_MODES else []
    dtype = DTYPES.get(cfg.dtype or base.config.get("dtype") or base.config.get("torch_dtype") or "", torch.float32)
    with staged_output(out, overwrite=overwrite) as staging, tempfile.TemporaryDirectory(prefix="lmforge-") as work:
        tensors = output_tensors(cfg, arch, base, opened, rows, layers, seed)
        count = write_tensors(staging, tensors, dtype)
        write_config(staging, base, cfg, arch, dtype)
        copy_tokenizer(base.folder, staging)
        from lmforge.merge.moe_eval import routing_accuracy

        def measure_routing() -> dict:
            if not cfg.routing_tasks:
                return {}
            return routing_accuracy(staging, cfg.routing_tasks, cfg.routing_limit, device=device)

        training = None
        if cfg.train_router is not None:  # routers trained in place in the staged weights, nothing else
            untrained = measure_routing()
            training = moe_training.train_routers(staging, cfg, Path(work), seed=seed, device=device)
            training["routing_accuracy_before"] = untrained
        routing = measure_routing()
        params = parameter_counts(count, cfg, layers, base.config)
        record = run_record(
            "merge",
            "moe",
            meter,
            inputs={"models": [{"ref": s.ref, "folder": str(s.folder)} for s in opened.values()]},
            config={"moe": raw, "options": {"seed": seed, "device": device, "architecture": arch}},
            tokens_seen=0,
            params_total=params["total"],
            size_bytes=sum(f.stat().st_size for f in staging.glob("*.safetensors")),
            metrics={"moe": {"params_active": params["active"], "routing_accuracy": routing}},
        )
        record["router"] = {"gate_mode": cfg.gate_mode, "degenerate_layers": degenerate, "training": training}
        log_file = Path(work) / "log.jsonl" if training else None
        write_run_files(staging, raw, record, _card(out, cfg, arch, params, routing, training), log_file)
    return out


def output_tensors(cfg: MoEConfig, arch: str, base: Source, opened: dict[str, Source], rows, layers: int, seed: int):
    """(name, shape, producer) for every output tensor, in write order; a producer reads or builds one tensor."""
    generator = torch.Generator().manual_seed(seed)
    plan: list[tuple[str, tuple[int, ...], Any]] = []
    for name, info in base.index.items():
        if ".mlp." not in name:
            plan.append((name, info.shape, lambda info=info: read_rows(info, dtype=torch.float32)))
    if arch == "qwen":
        _qwen_biases(plan, base, layers)

    def expert_tensor(expert: Expert, layer: int, part: str) -> torch.Tensor:
        info = opened[expert.source_model].index[f"model.layers.{layer}.mlp.{part}.weight"]
        tensor = read_rows(info, dtype=torch.float32)
        if expert.noise_scale is not None:
            tensor = tensor + torch.randn(tensor.shape, generator=generator) * expert.noise_scale
        if part == "down_proj" and expert.residual_scale is not None:
            tensor = tensor * expert.residual_scale
        return tensor

    experts, count = cfg.experts, len(cfg.experts)
    inner, width = base.index["model.layers.0.mlp.gate_proj.weight"].shape  # [I, H]
    for layer in range(layers):
        prefix = f"model.layers.{layer}.mlp"
        if arch == "mixtral":  # transformers' fused layout: gate and up stacked on dim 1, experts on dim 0

            def gate_up(layer=layer):
                parts = [
                    torch.cat([expert_tensor(e, layer, "gate_proj"), expert_tensor(e, layer, "up_proj")])
                    for e in experts
                ]
                return torch.stack(parts)

            def down(layer=layer):
                return torch.stack([expert_tensor(e, layer, "down_proj") for e in experts])

            plan.append((f"{prefix}.experts.gate_up_proj", (count, 2 * inner, width), gate_up))
            plan.append((f"{prefix}.experts.down_proj", (count, width, inner), down))
        else:
            shared = (cfg.shared_experts or [])[0]  # check() requires exactly one
            for part in MLP_PARTS:
                shape = (width, inner) if part == "down_proj" else (inner, width)
                for i, expert in enumerate(experts):
                    make = lambda e=expert, layer=layer, p=part: expert_tensor(e, layer, p)  # noqa: E731
                    plan.append((f"{prefix}.experts.{i}.{part}.weight", shape, make))
                make = lambda s=shared, layer=layer, p=part: expert_tensor(s, layer, p)  # noqa: E731
                plan.append((f"{prefix}.shared_expert.{part}.weight", shape, make))
            plan.append((f"{prefix}.shared_expert_gate.weight", (1, width), lambda layer=layer: rows[layer, count:]))
        plan.append((f"{prefix}.gate.weight", (count, width), lambda layer=layer: rows[layer, :count]))
    return plan


def _qwen_biases(plan: list, base: Source, layers: int) -> None:
    """Qwen2 attention has q/k/v biases; a llama base has none, so they are written as zeros (as mergekit does)."""
    heads = int(base.config["num_attention_heads"])
    kv = int(base.config.get("num_key_value_heads") or heads)
    head_dim = int(base.config.get("head_dim") or int(base.config["hidden_size"]) // heads)
    for layer in range(layers):
        for part, count in (("q_proj", heads), ("k_proj", kv), ("v_proj", kv)):
            name = f"model.layers.{layer}.self_attn.{part}.bias"
            if name not in base.index:
                plan.append((name, (count * head_dim,), lambda n=count * head_dim: torch.zeros(n)))


def write_tensors(staging: Path, plan: list[tuple[str, tuple[int, ...], Any]], dtype: torch.dtype) -> dict[str, int]:
    """Plan the shards from the known shapes, then build and write one tensor at a time (RAM: one layer's
    experts). Returns numel per name."""
    places = plan_shards(staging, [(name, dtype, shape) for name, shape, _ in plan], 5 * 10**9)
    for name, shape, make in plan:
        tensor = make()
        if tuple(tensor.shape) != shape:
            raise AssertionError(f"{name}: planned {shape}, built {tuple(tensor.shape)}")
        write_at(places[name], tensor.to(dtype).contiguous())
    return {name: _numel(shape) for name, shape, _ in plan}


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def write_config(staging: Path, base: Source, cfg: MoEConfig, arch: str, dtype: torch.dtype) -> None:
    """config.json of the output, built by transformers' own config classes from the base's (as mergekit does)."""
    import transformers

    base_config = transformers.AutoConfig.from_pretrained(base.folder)
    count = len(cfg.experts)
    if arch == "mixtral":
        if not isinstance(base_config, transformers.MistralConfig):
            mistral = transformers.MistralConfig(**base_config.to_dict())
            mistral.sliding_window = None
            mistral.max_position_embeddings = base_config.max_position_embeddings
            base_config = mistral
        out = transformers.MixtralConfig(**base_config.to_dict())
        out.architectures = ["MixtralForCausalLM"]
        out.num_local_experts = count
    else:
        out = transformers.Qwen2MoeConfig(**base_config.to_dict())
        out.architectures = ["Qwen2MoeForCausalLM"]
        out.num_experts = count
        out.decoder_sparse_step = 1
        out.norm_topk_prob = True
        out.use_sliding_window = False
        out.shared_expert_intermediate_size = out.intermediate_size
        out.moe_intermediate_size = out.intermediate_size
    out.num_experts_per_tok = cfg.experts_per_token
    out.sliding_window = None
    out.dtype = dtype
    if count & (count - 1):
        log.warning(f"{count} experts is not a power of two: llama.cpp will not load this model")
    out.save_pretrained(staging)
    generation = base.folder / "generation_config.json"
    if generation.is_file():
        shutil.copy(generation, staging / generation.name)


def copy_tokenizer(base: Path, staging: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(base).save_pretrained(staging)


def parameter_counts(numel: dict[str, int], cfg: MoEConfig, layers: int, base_config: dict) -> dict[str, int]:
    """Total parameters, and those one token uses: all but the (E - k) routed experts it skips per layer."""
    total = sum(numel.values())
    per_expert = 3 * int(base_config["hidden_size"]) * int(base_config["intermediate_size"])
    skipped = (len(cfg.experts) - cfg.experts_per_token) * per_expert * layers
    return {"total": total, "active": total - skipped}


def _card(out: Path, cfg: MoEConfig, arch: str, params: dict, routing: dict, training: dict | None) -> str:
    trained = f", then trained for {training['steps']} steps (routers only)" if training else ""
    sentence = (
        f"A {arch} mixture of {len(cfg.experts)} experts ({cfg.experts_per_token} per token) built by `lmforge moe` "
        f"from `{cfg.base_model}`, router rows by gate_mode `{cfg.gate_mode}`{trained}. Experts:"
    )
    sections: list = [[f"- `{e.source_model}`" for e in cfg.experts + (cfg.shared_experts or [])]]
    sections.append(
        CardTable(
            ["parameters", "count"], [["total", f"{params['total']:,}"], ["active per token", f"{params['active']:,}"]]
        )
    )
    if routing:
        rows = [[task, f"{share:.3f}"] for task, share in routing.get("by_task", {}).items()]
        sections.append(CardTable(["task", "share of tokens sent to its expert"], rows, "Routing accuracy"))
    return model_card(out.name, sentence, sections)
