"""The student: a smaller model that shares the teacher's tokenizer, built from the teacher or given.

Layer rules pick which teacher layers a student keeps: `stride` (evenly spaced, first and last included),
`first_last` (the first and last halves of the kept count), and `measured` (the default): every candidate
that drops one contiguous block of layers (Gromov et al. 2024, arXiv:2403.17887), plus the stride and
first_last picks, is scored by its KL to the teacher on a calibration batch, and the one whose removal hurts
least wins. Measured on SmolLM2-135M, every other layer starts worse than a random init (completion CE 13.1
vs 11.05), first-and-last quarters far better: a rule that measures cannot pick the first by accident.
A narrower MLP keeps, per layer, the intermediate channels with the largest mean |activation| x ||down_proj
column|| on the calibration batch (activation-based importance as in Minitron, Muralidharan et al. 2024).
Width pruning (distill/prune.py, Minitron) narrows a built student after its layers are picked: hidden size,
MLP width and query heads, scored on the same calibration batch by the depth-picked model itself.
The pre-flight "init quality" line compares the student's CE and KL with a random init of the same shape.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM

from lmforge.data.chat import IGNORE_INDEX
from lmforge.distill import prune
from lmforge.distill.objectives import DenseTeacher, Objective, distill_loss
from lmforge.errors import UserError
from lmforge.eval.scoring import LOGIT_TRANSFORMS
from lmforge.train.chunked import model_inputs, on_model_device

log = logging.getLogger("lmforge.distill")


def stride_layers(total: int, keep: int) -> list[int]:
    """`keep` evenly spaced layer indices out of `total`, first and last included."""
    if keep == 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def first_last_layers(total: int, keep: int) -> list[int]:
    """The first ceil(keep / 2) and the last floor(keep / 2) layers."""
    head = (keep + 1) // 2
    return list(range(head)) + list(range(total - (keep - head), total))


LAYER_RULES: dict[str, Callable[[int, int], list[int]]] = {"stride": stride_layers, "first_last": first_last_layers}


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder's list of blocks (`model.model.layers` for llama-like models), or one clear line."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise UserError(
            f"{type(model).__name__} keeps its blocks elsewhere than decoder.layers: give a student model instead "
            "of student_layers"
        )
    return layers


def check_heads(*models) -> None:
    """The chunked losses project final hidden states by the output head; logit soft-capping breaks that."""
    for model in models:
        if any(getattr(model.config, name, None) for name in LOGIT_TRANSFORMS):
            raise UserError(f"{type(model).__name__} transforms its logits (soft-capping/scaling): not supported yet")


def check_vocabularies(teacher_tokenizer, student_tokenizer) -> None:
    """Refuse tokenizers that really differ, naming the first differing token; a longer tail is allowed."""
    t_tokens = {i: tok for tok, i in teacher_tokenizer.get_vocab().items()}
    s_tokens = {i: tok for tok, i in student_tokenizer.get_vocab().items()}
    for i in range(min(len(t_tokens), len(s_tokens))):
        if t_tokens.get(i) != s_tokens.get(i):
            raise UserError(
                f"teacher and student vocabularies differ at token id {i} (teacher {t_tokens.get(i)!r}, student "
                f"{s_tokens.get(i)!r}): distillation needs one tokenizer (cross-tokenizer distillation is not "
                "supported): pick a student of the teacher's family"
            )
    if getattr(teacher_tokenizer, "chat_template", None) != getattr(student_tokenizer, "chat_template", None):
        log.warning("teacher and student chat templates differ: the data is rendered with the teacher's template")


def shared_vocab(teacher, student) -> int:
    """Rows of the output heads both models have (padding rows beyond a family's true vocabulary are dropped)."""
    rows = (teacher.get_output_embeddings().weight.shape[0], student.get_output_embeddings().weight.shape[0])
    if rows[0] != rows[1]:
        log.info("teacher and student heads have %d and %d rows: comparing the first %d", *rows, min(rows))
    return min(rows)


def completion_rows(model, batch: dict, vocab: int):
    """(final hidden states at the trained positions (n, d), head weight (vocab, d), head bias, targets (n,))."""
    batch = on_model_device(model, batch)
    targets = batch["labels"][:, 1:]  # (batch, seq - 1)
    keep = targets != IGNORE_INDEX
    hidden = model.get_decoder()(**model_inputs(batch)).last_hidden_state[:, :-1][keep]
    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    if len(weight) > vocab:  # a slice only when needed: its backward makes a vocabulary-sized copy
        weight, bias = weight[:vocab], None if bias is None else bias[:vocab]
    return hidden, weight, bias, targets[keep]


@torch.no_grad()
def quality(student, teacher, batch: dict, vocab: int) -> dict:
    """Per-token completion CE of the student and its KL(teacher || student) on a batch."""
    rows, weight, bias, targets = completion_rows(student, batch, vocab)
    t_rows, t_weight, t_bias, _ = completion_rows(teacher, batch, vocab)
    objectives = [Objective("ce"), Objective("forward_kl")]
    _, stats = distill_loss(rows, weight, DenseTeacher(t_rows, t_weight, t_bias), targets, objectives, head_bias=bias)
    n = max(stats["tokens"], 1)
    return {"ce": stats.get("ce", 0.0) / n, "kl": stats.get("forward_kl", 0.0) / n}


@torch.no_grad()
def measured_layers(teacher, batch: dict | list[dict], keep: int, vocab: int) -> tuple[list[int], list[dict]]:
    """The kept layers whose dropped complement raises KL(teacher || student) least on `batch`.

    Candidates: every contiguous block of total - keep layers dropped, plus the stride and first_last picks.
    Each is run as the teacher with its layer list swapped (no copy). Given several batches (the task's and
    general text), a candidate's KL and CE are the means of the per-batch values, so each batch weighs the
    same. Returns the pick and every candidate's {"layers", "kl", "ce"}, best first.
    """
    batches = batch if isinstance(batch, list) else [batch]
    layers = decoder_layers(teacher)
    total = len(layers)
    drop = total - keep
    candidates = [list(range(start)) + list(range(start + drop, total)) for start in range(total - drop + 1)]
    for rule in LAYER_RULES.values():
        if rule(total, keep) not in candidates:
            candidates.append(rule(total, keep))
    references = [completion_rows(teacher, b, vocab)[:3] for b in batches]
    scores = []
    decoder = teacher.get_decoder()
    try:
        for kept in candidates:
            decoder.layers = torch.nn.ModuleList([layers[i] for i in kept])
            kl = ce = 0.0
            for b, (t_rows, t_weight, t_bias) in zip(batches, references, strict=True):
                rows, weight, bias, targets = completion_rows(teacher, b, vocab)
                _, stats = distill_loss(
                    rows,
                    weight,
                    DenseTeacher(t_rows, t_weight, t_bias),
                    targets,
                    [Objective("ce"), Objective("forward_kl")],
                    head_bias=bias,
                )
                n = max(stats["tokens"], 1)
                kl, ce = kl + stats["forward_kl"] / n / len(batches), ce + stats["ce"] / n / len(batches)
            scores.append({"layers": kept, "kl": kl, "ce": ce})
    finally:
        decoder.layers = layers
    scores.sort(key=lambda s: s["kl"])
    return scores[0]["layers"], scores


@torch.no_grad()
def mlp_importance(teacher, batch: dict) -> list[torch.Tensor]:
    """Per layer, (intermediate,) importance: mean |input of down_proj| x column norm of down_proj."""
    sums: list[torch.Tensor | None] = [None] * len(decoder_layers(teacher))
    handles = []
    mask = batch["attention_mask"].bool()
    for index, layer in enumerate(decoder_layers(teacher)):
        down = getattr(getattr(layer, "mlp", None), "down_proj", None)
        if down is None:
            raise UserError("student_intermediate needs gated MLPs with mlp.down_proj (llama-like): leave it null")

        def hook(module, args, index=index):
            sums[index] = args[0][mask].abs().float().mean(0)  # (intermediate,)

        handles.append(down.register_forward_pre_hook(hook))
    try:
        teacher.get_decoder()(**model_inputs(batch))
    finally:
        for handle in handles:
            handle.remove()
    return [
        s * layer.mlp.down_proj.weight.float().norm(dim=0)
        for s, layer in zip(sums, decoder_layers(teacher), strict=True)
    ]


def student_config(teacher, layers: list[int], intermediate: int | None):
    """The teacher's config with fewer layers (and optionally a narrower MLP)."""
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    if intermediate is not None:
        if not 0 < intermediate <= config.intermediate_size:
            raise UserError(
                f"student_intermediate must be in 1..{config.intermediate_size} (the teacher's), got {intermediate}"
            )
        config.intermediate_size = intermediate
    return config


def random_student(config, seed: int):
    """A randomly initialised model of `config` (the init-quality baseline, and the frame weights load into).

    Always float32, whatever precision the teacher was loaded in (bf16 on a GPU, whose config says so): the
    student is trained, and AdamW updates below bf16's resolution would vanish in bf16 weights.
    """
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def copy_teacher_weights(student, teacher, layers: list[int], importance: list[torch.Tensor] | None) -> None:
    """Load the teacher's embeddings, final norm, head and kept layers into `student` (MLP channels sliced)."""
    t_layers, s_layers = decoder_layers(teacher), decoder_layers(student)
    prefix = next(name for name, module in student.named_modules() if module is s_layers) + "."
    width = student.config.intermediate_size
    source = teacher.state_dict()
    state = {}
    for key in student.state_dict():
        if not key.startswith(prefix):
            state[key] = source[key]
            continue
        index, rest = key[len(prefix) :].split(".", 1)
        teacher_index = layers[int(index)]
        value = source[f"{prefix}{teacher_index}.{rest}"]
        if importance is not None and width < t_layers[teacher_index].mlp.down_proj.weight.shape[1]:
            keep = importance[teacher_index].topk(width).indices.sort().values
            if rest.startswith(("mlp.gate_proj.", "mlp.up_proj.")):
                value = value[keep]
            elif rest == "mlp.down_proj.weight":
                value = value[:, keep]
        state[key] = value
    student.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    for i, layer in enumerate(s_layers):  # the KV cache indexes layers by position
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = i


def width_shape(teacher, layers: int, width: prune.WidthSettings) -> prune.Shape:
    """The pruned student's shape for `width` (checked against the teacher, before anything is written)."""
    prune.check_model(teacher)
    return prune.target_shape(teacher.config, layers, width, sum(p.numel() for p in teacher.parameters()))


def width_pruned(model, batches: list[dict], shape: prune.Shape):
    """`model` narrowed to `shape`, keeping the units with the largest activations on `batches` (the task's
    calibration batch, and general text when the run mixes it in)."""
    before = model.config
    pruned = prune.prune(model, prune.choose(prune.importance(model, batches), before, shape))
    log.info(
        "width pruning: hidden %d -> %d, MLP %d -> %d, query heads %d -> %d (%d -> %d parameters)",
        before.hidden_size,
        shape.hidden_size,
        before.intermediate_size,
        shape.intermediate_size,
        before.num_attention_heads,
        shape.num_attention_heads,
        sum(p.numel() for p in model.parameters()),
        sum(p.numel() for p in pruned.parameters()),
    )
    return pruned
