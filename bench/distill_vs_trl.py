"""`lmforge distill` side by side with TRL's GKDTrainer (trl 1.16.0), plus two checks of TRL's GKD loss.

Both tools distil the same teacher (`--teacher`, default: lmforge's `default` SmolLM2-135M-Instruct folder) into
the same student: a model folder written once from the teacher's layers (`--student-layers`, default 14: the first
and last 7 of 30, ~78M parameters), in fp32 on the CPU, on the same records: the first `--train + --val` of the
built-in `dates` task's train split as {"prompt", "completion": answer}, split by lmforge's seeded `split_records`.
lmforge reads them from a jsonl with `data.val_fraction`; TRL gets the training records as `messages`, in the order
lmforge's loop will draw them, and samples sequentially, so both see the same batches in the same order (TRL's
DataCollatorForChatML also trains the template's newline after <|im_end|>: one more position per record). Same
batch, steps, peak learning rate, cosine schedule without warmup, AdamW, weight decay 0, clipping at 1.0, max
length; full fine-tuning, no packing, nothing evaluated during training. The objective is the generalized JSD with
beta 0.5 (symmetric, so the two tools' beta conventions cannot differ) at temperature 1 (TRL's loss ignores its
temperature; see below); on-policy samples are drawn at temperature 1 with up to `--max-new-tokens` tokens.

Runs (each tool in its own subprocess, order alternating over repeats), compared in three cases:
- online:    TRL GKD off-policy (lmbda 0, teacher in memory)  vs lmforge signal.kind=offline
- on_policy: TRL GKD lmbda=`--lmbda` (the student samples)    vs lmforge signal.kind=on_policy (same fraction)
- cached:    TRL GKD off-policy (the online run's numbers)     vs lmforge signal.kind=cached (teacher top-k on disk)
Measured: seconds per optimiser step of the training loop (lmforge: log.jsonl `elapsed_s`; TRL: a callback's clock
from on_train_begin to the last on_step_end), whole-process wall seconds and peak RSS (os.wait4, bench/peers.py).
Afterwards every student (and the untrained one) is scored in this process the same way: forward KL(teacher ||
student) per completion token (completion + EOS, lmforge's render_example), plus JSD(0.5) and completion CE, over
the held-out records.

Loss checks (section "trl_loss_checks", run in TRL's venv on fixed logits, and lmforge's objectives when
lmforge.distill.objectives exists): (1) GKDTrainer.compute_loss never passes its temperature to
generalized_jsd_loss, so the trained loss is the same at T = 1, 2, 4; (2) after on-policy generation the loss is
divided by `num_items_in_batch`, which transformers' Trainer counted from the dataset's labels before
training_step replaced them with the generated ones, so the per-token loss is scaled by generated / dataset
tokens (a per-token JSD above ln 2 is the symptom). The on-policy TRL run also records, every step, the divisor
it used and the tokens it really trained on.

Targets (issue 5): lmforge <= 0.7x TRL's step time and <= 0.7x its peak RSS with an online teacher, <= 0.5x its
peak RSS with the cached signal, at equal or lower held-out KL (within 2% relative). With lmforge's
`--lmforge-set train.gradient_checkpointing=true`, pass `--trl-gradient-checkpointing` too for a like-for-like ratio
(TRL then recomputes its activations the same way, non-reentrant). `--lmforge-set train.optimizer_in_backward=true`
needs `--max-grad-norm none`, which turns clipping off in both tools.

Run from the repository root (about 15 minutes on an idle 2-core machine with the defaults, more under load,
plus the one-off TRL install):

    .venv/bin/python bench/distill_vs_trl.py --threads 1
    .venv/bin/python bench/distill_vs_trl.py --threads 1 --peer-venv /tmp/venv-trl --steps 10   # quicker
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import peers

ROOT = Path(__file__).resolve().parent.parent
PEER = "trl==1.16.0"
SHARED_PINS = ("transformers", "tokenizers", "accelerate", "peft")  # pinned in the peer venv to lmforge's versions
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
OFFLINE |= {"TRL_EXPERIMENTAL_SILENCE": "1"}  # GKDTrainer lives in trl.experimental
BETA, TEMPERATURE = 0.5, 1.0
# (tool, signal): lmforge's signal.kind, or TRL's off_policy / on_policy.
RUNS = (
    ("trl", "off_policy"), ("lmforge", "offline"), ("trl", "on_policy"), ("lmforge", "on_policy"), ("lmforge", "cached")
)  # fmt: skip
CASES = {  # case -> (lmforge run, TRL run, step-time target, peak-RSS target)
    "online": (("lmforge", "offline"), ("trl", "off_policy"), 0.7, 0.7),
    "on_policy": (("lmforge", "on_policy"), ("trl", "on_policy"), None, None),
    "cached": (("lmforge", "cached"), ("trl", "off_policy"), None, 0.5),
}
TARGET_KL = 0.02  # "equal or lower KL": lmforge's held-out KL at most 2% above TRL's

# Runs in the TRL virtualenv: argv[1] is a JSON spec written by `trl_spec`.
TRL_SCRIPT = r'''
import json
import sys
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl.experimental.gkd import GKDConfig, GKDTrainer

spec = json.loads(open(sys.argv[1]).read())


class Clock(TrainerCallback):
    """perf_counter at on_train_begin and at every on_step_end."""

    def __init__(self):
        self.start, self.steps = None, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(time.perf_counter())


tokenizer = AutoTokenizer.from_pretrained(spec["student"])
student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32)
teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=torch.float32)
dataset = Dataset.from_list([
    {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
    for r in spec["train"]
])
config = GKDConfig(
    output_dir=spec["scratch"], per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
    max_steps=spec["steps"], learning_rate=spec["lr"], lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
    max_grad_norm=spec["max_grad_norm"] or 0.0, max_length=spec["max_length"], packing=False, bf16=False, fp16=False,
    gradient_checkpointing=spec["gradient_checkpointing"], gradient_checkpointing_kwargs={"use_reentrant": False},
    use_cpu=True, report_to="none", eval_strategy="no", save_strategy="no", logging_steps=1,
    disable_tqdm=True, dataloader_num_workers=0, seed=spec["seed"],
    train_sampling_strategy="sequential",  # the records come in lmforge's batch order (`trl_order`)
    lmbda=spec["lmbda"], beta=spec["beta"], max_new_tokens=spec["max_new_tokens"],
    temperature=spec["temperature"],  # sampling only: compute_loss does not pass it to the loss
)
clock = Clock()
trainer = GKDTrainer(
    model=student, teacher_model=teacher, args=config, train_dataset=dataset, processing_class=tokenizer,
    callbacks=[clock],
)
first = trainer.data_collator([dataset[0]])
divisors = []  # per micro-batch: the divisor TRL used and the tokens the loss really covered
compute_loss = trainer.compute_loss


def counting_compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
    """GKDTrainer.compute_loss unchanged, with its divisor and real token count recorded."""
    loss = compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
    value = loss[0] if return_outputs else loss
    trained = int((inputs["labels"][:, 1:] != -100).sum())
    used = None if num_items_in_batch is None else int(num_items_in_batch)
    divisors.append({"num_items_in_batch": used, "trained_tokens": trained, "loss": float(value)})
    return loss


trainer.compute_loss = counting_compute_loss
trainer.train()
trainer.model.save_pretrained(spec["out"])
tokenizer.save_pretrained(spec["out"])
steps = [h for h in trainer.state.log_history if "loss" in h]
report = {
    "train_s": clock.steps[-1] - clock.start,
    "step_ends_s": [t - clock.start for t in clock.steps],
    "steps": len(steps),
    "first_loss": steps[0]["loss"],
    "last_loss": steps[-1]["loss"],
    "optim": str(config.optim),
    "divisors": divisors,
    "first_example": {"input_ids": first["input_ids"][0].tolist(),
                      "trained": [t for t in first["labels"][0].tolist() if t != -100]},
}
open(spec["report"], "w").write(json.dumps(report))
'''

# Runs in the TRL virtualenv on the tensors `check_inputs` saved (argv[1]); prints one JSON object. Fixed logits
# stand in for the models, so TRL's own compute_loss and generalized_jsd_loss run unchanged on known values.
TRL_CHECKS_SCRIPT = r"""
import inspect
import json
import sys
from types import SimpleNamespace

import torch
from trl.experimental.gkd import GKDTrainer

x = torch.load(sys.argv[1])


class Fixed(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.fixed = logits

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.fixed)


def trainer(teacher_logits, beta, temperature):  # what GKDTrainer.compute_loss reads, as __init__ sets it
    return SimpleNamespace(teacher_model=Fixed(teacher_logits), beta=beta, temperature=temperature,
                           generalized_jsd_loss=GKDTrainer.generalized_jsd_loss)


def inputs(labels):
    return {"input_ids": labels.clamp(min=0), "attention_mask": torch.ones_like(labels), "labels": labels}


out = {"compute_loss_source_mentions_temperature": "temperature" in inspect.getsource(GKDTrainer.compute_loss)}
for beta, t in x["grid"]:
    trained = GKDTrainer.compute_loss(trainer(x["teacher"], beta, t), Fixed(x["student"]), inputs(x["labels"]))
    direct = GKDTrainer.generalized_jsd_loss(
        x["student"][:, :-1], x["teacher"][:, :-1], x["labels"][:, 1:], beta=beta, temperature=t
    )
    out[f"beta={beta} T={t}"] = {"compute_loss": trained.item(), "generalized_jsd_loss": direct.item()}
num_items = int((x["dataset_labels"][:, 1:] != -100).sum())  # as transformers' Trainer._get_num_items_in_batch
disagree = trainer(x["disagree_teacher"], 0.5, 1.0)
loss = GKDTrainer.compute_loss(disagree, Fixed(x["disagree_student"]), inputs(x["generated_labels"]), False, num_items)
out["on_policy"] = {"num_items_in_batch": num_items, "loss": loss.item()}
print(json.dumps(out))
"""


@dataclass
class RunResult:
    """What one child process cost and what its training loop reported."""

    tool: str
    signal: str
    repeat: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    train_s: float
    steps: int
    s_per_step: float
    steady_s_per_step: float  # steps 2..N: without the first step's warm-up
    kl: float = math.nan
    jsd: float = math.nan
    ce: float = math.nan
    load_1m_before: float | None = None
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- setup


def make_student(teacher: Path, out: Path, n_layers: int) -> tuple[Path, list[int]]:
    """Write a student folder keeping the teacher's first ceil(n/2) and last floor(n/2) decoder layers."""
    from safetensors.torch import load_file, save_file

    config = json.loads((teacher / "config.json").read_text())
    total = config["num_hidden_layers"]
    if not 0 < n_layers < total:
        raise SystemExit(f"--student-layers must be in 1..{total - 1}")
    keep = list(range((n_layers + 1) // 2)) + list(range(total - n_layers // 2, total))
    tensors: dict = {}
    for shard in sorted(teacher.glob("*.safetensors")):
        tensors |= load_file(shard)
    student = {}
    for name, tensor in tensors.items():
        if name.startswith("model.layers."):
            index, rest = name[len("model.layers.") :].split(".", 1)
            if int(index) not in keep:
                continue
            name = f"model.layers.{keep.index(int(index))}.{rest}"
        student[name] = tensor
    out.mkdir(parents=True)
    save_file(student, out / "model.safetensors", metadata={"format": "pt"})
    config["num_hidden_layers"] = len(keep)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for path in teacher.iterdir():  # tokenizer, chat template, generation config
        if path.is_file() and not path.name.endswith(".safetensors") and path.name not in ("config.json",):
            shutil.copy(path, out / path.name)
    return out, keep


def make_records(n_train: int, n_val: int, seed: int) -> tuple[list[dict], list[dict], list[dict]]:
    """(all records, train, held-out): lmforge's own split of the first n_train + n_val `dates` records."""
    from lmforge.data import synthetic
    from lmforge.data.sources import split_records

    records = [{"prompt": r["prompt"], "completion": r["answer"]} for r in synthetic.examples("dates", "train")]
    records = records[: n_train + n_val]
    train, val = split_records(records, n_val / (n_train + n_val), seed)
    if len(val) != n_val:
        raise RuntimeError(f"split gave {len(val)} held-out records, not {n_val}")
    return records, train, val


def trl_order(train: list[dict], n: int, seed: int) -> list[dict]:
    """The first n records lmforge's loop will draw (its seeded epoch order), so TRL, sampling sequentially,
    sees the same batches in the same order."""
    from lmforge.train.loop import epoch_order

    order = [i for epoch in range(-(-n // len(train))) for i in epoch_order(len(train), seed, epoch)]
    return [train[i] for i in order[:n]]


def lmforge_config(args: argparse.Namespace, signal: str, teacher: Path, student: Path, data: Path, out: Path) -> dict:
    """A distill config as a dict (written as JSON, which is YAML); no task scoring before/after, as in TRL."""
    train = dict(lr=args.lr, max_steps=args.steps, batch_size=args.batch_size, grad_accum=1, warmup_steps=0)
    train |= dict(schedule="cosine", weight_decay=0.0, max_grad_norm=args.max_grad_norm, eval_every=0)
    train |= dict(save_every=args.steps + 1)
    fraction = args.lmbda if signal == "on_policy" else 0.0
    return {
        "output": str(out),
        "teacher": str(teacher),
        "student": str(student),
        "method": "full",
        "overwrite": True,
        "data": dict(path=str(data), val_fraction=args.val / (args.train + args.val), max_length=args.max_length),
        "train": train | {"seed": args.seed},
        "objectives": [{"loss": "jsd", "weight": 1.0, "beta": BETA, "temperature": TEMPERATURE}],
        "signal": dict(  # samples at T, as TRL's GKDConfig.temperature
            kind=signal, on_policy_fraction=fraction, temperature=TEMPERATURE, max_new_tokens=args.max_new_tokens
        ),
        "general": {"ratio": 0},  # TRL's GKDTrainer trains on the task rows only: no general-text mix here
        "eval": {"probe": False},
    }


def trl_spec(args: argparse.Namespace, signal: str, teacher: Path, student: Path, train: list, run_dir: Path) -> dict:
    return dict(
        teacher=str(teacher), student=str(student), train=train, batch_size=args.batch_size, steps=args.steps,
        lr=args.lr, max_length=args.max_length, seed=args.seed, lmbda=args.lmbda if signal == "on_policy" else 0.0,
        beta=BETA, temperature=TEMPERATURE, max_new_tokens=args.max_new_tokens, scratch=str(run_dir / "scratch"),
        out=str(run_dir / "student"), report=str(run_dir / "report.json"),
        gradient_checkpointing=args.trl_gradient_checkpointing, max_grad_norm=args.max_grad_norm,
    )  # fmt: skip


# ---------------------------------------------------------------- measuring


def read_lmforge_log(output: Path) -> tuple[list[float], dict]:
    """(per-step elapsed seconds, extras) from lmforge's log.jsonl."""
    entries = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines() if line]
    steps = [e for e in entries if "loss" in e]
    extra = {
        "first_loss": steps[0]["loss"],
        "last_loss": steps[-1]["loss"],
        "max_step_loss": max(e["loss"] for e in steps),
        "trained_tokens_per_step": [e["tokens"] for e in steps],
        "input_tokens": sum(e["input_tokens"] for e in steps),
    }
    return [e["elapsed_s"] for e in steps], extra


def run_tool(tool: str, signal: str, repeat: int, args, folders: dict, peer: Path, workdir: Path) -> RunResult:
    """One training run in its own subprocess; the student lands in run_dir/student."""
    run_dir = workdir / f"{tool}-{signal}-{repeat}"
    run_dir.mkdir()
    env = {**os.environ, **OFFLINE, "HF_DATASETS_CACHE": str(run_dir / "hf_datasets")}
    if args.threads:
        env |= {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if tool == "lmforge":
        config = run_dir / "distill.yaml"
        settings = lmforge_config(
            args, signal, folders["teacher"], folders["student"], workdir / "records.jsonl", run_dir / "student"
        )
        config.write_text(json.dumps(settings))
        command = [str(args.lmforge_python), "-m", "lmforge.cli", "distill", str(config), *args.lmforge_set]
    else:
        spec = run_dir / "spec.json"
        train = json.loads((workdir / "train.json").read_text())
        spec.write_text(json.dumps(trl_spec(args, signal, folders["teacher"], folders["student"], train, run_dir)))
        command = [str(peer), str(workdir / "trl_gkd.py"), str(spec)]
    print(f"[{repeat + 1}/{args.repeats}] {tool:<8} {signal:<11}...", end=" ", flush=True)
    load = os.getloadavg()[0]  # other work on a shared machine shows here
    wall, cpu, rss = peers.measure(command, env, run_dir / "log.txt", args.timeout)
    if tool == "lmforge":
        ends, extra = read_lmforge_log(run_dir / "student")
    else:
        extra = json.loads((run_dir / "report.json").read_text())
        ends = extra.pop("step_ends_s")
        extra.pop("train_s")
    steady = (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else ends[-1]
    result = RunResult(tool, signal, repeat, wall, cpu, rss, ends[-1], len(ends), ends[-1] / len(ends), steady)
    result.load_1m_before, result.extra = load, extra
    print(f"{wall:6.1f} s wall, {result.s_per_step:5.2f} s/step, {rss:6.0f} MB peak RSS (load before {load:.1f})")
    return result


# ---------------------------------------------------------------- scoring


def held_out_batches(tokenizer, records: list[dict], max_length: int, batch_size: int = 8) -> list[dict]:
    """Held-out records rendered as in training (lmforge's render_example), collated into batches."""
    from lmforge.data.chat import render_example
    from lmforge.data.packing import collate

    examples = [render_example(tokenizer, record, max_length) for record in records]
    rows = [
        {"input_ids": e.input_ids, "labels": e.labels, "position_ids": list(range(len(e.input_ids)))} for e in examples
    ]
    return [collate(rows[i : i + batch_size], tokenizer.pad_token_id) for i in range(0, len(rows), batch_size)]


def completion_log_probs(model, batches: list[dict]) -> list:
    """Per batch: log-softmax over the vocabulary at every position that predicts a completion label, fp32."""
    import torch

    out = []
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            keep = batch["labels"][:, 1:] != -100
            out.append(torch.log_softmax(logits[:, :-1][keep].float(), dim=-1))  # (completion tokens, vocab)
    return out


def score(model, batches: list[dict], teacher_lp: list) -> dict:
    """Per completion token, over the held-out batches: KL(teacher || student), JSD(0.5) and student CE."""
    import torch

    kl = jsd = ce = 0.0
    tokens = 0
    for batch, lp_t, lp_s in zip(batches, teacher_lp, completion_log_probs(model, batches), strict=True):
        targets = batch["labels"][:, 1:][batch["labels"][:, 1:] != -100]
        kl += float((lp_t.exp() * (lp_t - lp_s)).sum())
        mix = torch.logaddexp(lp_t, lp_s) - math.log(2)
        jsd += float(0.5 * (lp_t.exp() * (lp_t - mix)).sum() + 0.5 * (lp_s.exp() * (lp_s - mix)).sum())
        ce -= float(lp_s.gather(-1, targets[:, None]).sum())
        tokens += len(targets)
    return {"kl": kl / tokens, "jsd": jsd / tokens, "ce": ce / tokens, "tokens": tokens}


def score_all(folders: dict, runs: list[RunResult], first: dict, val: list, workdir: Path, max_length: int) -> dict:
    """Score every trained student and the untrained one against the teacher, in this process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.data.chat import render_example

    tokenizer = AutoTokenizer.from_pretrained(folders["teacher"])
    batches = held_out_batches(tokenizer, val, max_length)
    teacher = AutoModelForCausalLM.from_pretrained(folders["teacher"], dtype=torch.float32).eval()
    teacher_lp = completion_log_probs(teacher, batches)
    teacher_ce = score(teacher, batches, teacher_lp)["ce"]
    del teacher

    def student_score(folder: Path) -> dict:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        return score(model, batches, teacher_lp)

    for run in runs:
        scores = student_score(workdir / f"{run.tool}-{run.signal}-{run.repeat}" / "student")
        run.kl, run.jsd, run.ce = scores["kl"], scores["jsd"], scores["ce"]
    scores = {"teacher_ce": teacher_ce, "untrained_student": student_score(folders["student"])}
    trl = next((run.extra["first_example"] for run in runs if "first_example" in run.extra), None)
    if trl:  # what each tool trains on for the first training record
        ours = render_example(tokenizer, first, max_length)
        scores["tokenisation"] = {
            "same_input_ids": trl["input_ids"][: len(ours.input_ids)] == ours.input_ids,
            "trl_trained": tokenizer.decode(trl["trained"]),
            "lmforge_trained": tokenizer.decode([t for t in ours.labels if t != -100]),
        }
    return scores


# ---------------------------------------------------------------- loss checks


def check_inputs(path: Path) -> dict:
    """Fixed tensors both tools' checks read (saved to `path` for TRL's venv).

    grid: (beta, T) pairs; student/teacher (2, 12, 32) logits with labels whose first 5 positions are prompt.
    On-policy: the dataset rows held 2 completion tokens each, the student then generated 16 per row, and on
    those the two models put all their mass on different tokens, so the true per-token JSD(0.5) is ln 2.
    """
    import torch

    generator = torch.Generator().manual_seed(0)
    x = {"grid": [(beta, t) for beta in (0.0, 0.5) for t in (1.0, 2.0, 4.0)]}
    x["student"] = torch.randn(2, 12, 32, generator=generator) * 3
    x["teacher"] = torch.randn(2, 12, 32, generator=generator) * 3
    x["labels"] = torch.randint(0, 32, (2, 12), generator=generator)
    x["labels"][:, :5] = -100
    x["dataset_labels"] = torch.full((2, 8), -100)
    x["dataset_labels"][:, -2:] = 7
    x["generated_labels"] = torch.full((2, 24), -100)
    x["generated_labels"][:, -16:] = 3
    x["disagree_student"] = torch.full((2, 24, 32), -30.0)
    x["disagree_teacher"] = torch.full((2, 24, 32), -30.0)
    x["disagree_student"][..., 0] = x["disagree_teacher"][..., 1] = 30.0
    torch.save(x, path)
    return x


def loss_checks(peer: Path, workdir: Path) -> dict:
    """TRL's GKD loss on fixed logits (temperature, on-policy divisor) beside lmforge's objectives on the same."""
    x = check_inputs(workdir / "check_inputs.pt")
    command = [str(peer), "-c", TRL_CHECKS_SCRIPT, str(workdir / "check_inputs.pt")]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **OFFLINE})
    if done.returncode != 0:
        raise RuntimeError(f"TRL loss checks failed:\n{done.stderr[-3000:]}")
    trl = json.loads(done.stdout.strip().splitlines()[-1])
    ours = lmforge_checks(x, workdir)
    temperature = {}
    for beta, t in x["grid"]:
        key = f"beta={beta} T={t}"
        temperature[key] = {"trl_trained": trl[key]["compute_loss"], "trl_function": trl[key]["generalized_jsd_loss"]}
        temperature[key] |= ours.pop(key, {})
    op = trl["on_policy"]
    generated = int((x["generated_labels"][:, 1:] != -100).sum())
    on_policy = {
        "dataset_completion_tokens": op["num_items_in_batch"],
        "generated_completion_tokens": generated,
        "trl_loss": op["loss"],
        "true_per_token_jsd": op["loss"] * op["num_items_in_batch"] / generated,
        "ln2": math.log(2),
    }
    trained = {
        beta: {v["trl_trained"] for k, v in temperature.items() if k.startswith(f"beta={beta} ")}
        for beta, _ in x["grid"]
    }
    verdicts = {
        "trl_compute_loss_passes_temperature": trl["compute_loss_source_mentions_temperature"],
        "trl_ignores_temperature": all(len(values) == 1 for values in trained.values()),
        "trl_on_policy_loss_above_ln2": op["loss"] > math.log(2) + 1e-6,
    }
    if "on_policy" in ours:
        scaled = [abs(v["lmforge_over_t2"] - v["trl_function"]) for v in temperature.values()]
        verdicts["lmforge_applies_temperature"] = max(scaled) < 1e-5 and all(
            len({v["lmforge"] for k, v in temperature.items() if k.startswith(f"beta={beta} ")}) == 3
            for beta, _ in x["grid"]
        )
        mine = ours["on_policy"]
        verdicts["lmforge_divides_by_generated_tokens"] = mine["loop_divisor"] == mine["generated_completion_tokens"]
        verdicts["lmforge_on_policy_jsd_at_most_ln2"] = mine["per_token_jsd"] <= math.log(2)
    return {"temperature": temperature, "on_policy": on_policy, "verdicts": verdicts, "lmforge": ours}


def lmforge_checks(x: dict, workdir: Path) -> dict:
    """lmforge's objectives on the same logits, and its on-policy divisor through its own collate and loss."""
    try:
        import torch

        from lmforge.distill import signals
        from lmforge.distill.objectives import DenseTeacher, Objective, distill_loss
        from lmforge.distill.run import Guards, make_loss_fn
        from lmforge.models.tiny import make_tiny_llama
        from lmforge.train.loop import loss_units
    except ImportError as error:
        return {"skipped": f"lmforge.distill is not importable ({error})"}
    out: dict = {}
    keep = x["labels"][:, 1:] != -100
    student, teacher = x["student"][:, :-1][keep], x["teacher"][:, :-1][keep]  # (n, V): logits = rows @ I
    identity = torch.eye(student.shape[-1])
    for beta, t in x["grid"]:
        objective = Objective("jsd", beta=beta, temperature=t)
        total, stats = distill_loss(
            student, identity, DenseTeacher(teacher, identity), x["labels"][:, 1:][keep], [objective]
        )
        out[f"beta={beta} T={t}"] = {
            "lmforge": total.item() / stats["tokens"],
            "lmforge_over_t2": total.item() / stats["tokens"] / t**2,
        }
    # On-policy through lmforge's own code: two tiny random llamas, dataset rows with 2 completion tokens each,
    # the student regenerates them (collate), the loop divides by loss_units(batch).
    from transformers import AutoModelForCausalLM

    models = [AutoModelForCausalLM.from_pretrained(make_tiny_llama(workdir / f"tiny-{s}", seed=s)) for s in (0, 1)]
    eos = models[0].config.eos_token_id if models[0].config.eos_token_id is not None else 2
    prompt = [5, 6, 7, 8, 9, 10]  # then 2 completion tokens: 11 and EOS
    rows = [{"input_ids": [*prompt, 11, eos], "labels": [-100] * 6 + [11, eos], "position_ids": list(range(8))}] * 2
    collate = signals.batch_collate(eos)
    settings = signals.SignalSettings(kind="on_policy", on_policy_fraction=1.0, max_new_tokens=16)
    torch.manual_seed(0)
    batch = signals.on_policy(collate, models[0], settings, eos, eos, lambda *_: None)(rows)
    loss_fn = make_loss_fn(models[1], None, [Objective("jsd", beta=0.5)], models[0].config.vocab_size, 256, Guards())
    with torch.no_grad():
        total, _ = loss_fn(models[0], batch)
    dataset_tokens = loss_units(collate(rows))
    out["on_policy"] = {
        "dataset_completion_tokens": dataset_tokens,
        "generated_completion_tokens": int((batch["labels"][:, 1:] != -100).sum()),
        "loop_divisor": loss_units(batch),
        "per_token_jsd": total.item() / loss_units(batch),
        "if_divided_by_dataset_tokens": total.item() / dataset_tokens,
    }
    return out


def on_policy_divisors(runs: list[RunResult]) -> dict:
    """From the on-policy runs: the divisor each tool used vs the tokens its loss covered."""
    out: dict = {}
    trl = next((r for r in runs if r.tool == "trl" and r.signal == "on_policy"), None)
    if trl is not None:
        used = [row for row in trl.extra.get("divisors", []) if row["num_items_in_batch"]]
        out["trl"] = {
            "divided_by_dataset_tokens": sum(row["num_items_in_batch"] for row in used),
            "generated_tokens_trained": sum(row["trained_tokens"] for row in used),
            "max_step_loss": max(row["loss"] for row in used),
            "max_true_per_token_loss": max(
                row["loss"] * row["num_items_in_batch"] / row["trained_tokens"] for row in used
            ),
        }
    ours = next((r for r in runs if r.tool == "lmforge" and r.signal == "on_policy"), None)
    if ours is not None:  # the loop divides each step by the tokens it trained on (log.jsonl "tokens")
        out["lmforge"] = {
            "divided_by_trained_tokens": sum(ours.extra["trained_tokens_per_step"]),
            "max_step_loss": ours.extra["max_step_loss"],
        }
    return out


# ---------------------------------------------------------------- comparing


def summarise(runs: list[RunResult]) -> dict:
    """Medians per run kind, ratios lmforge / TRL per case, and the targets' verdicts."""
    keys = ("s_per_step", "steady_s_per_step", "train_s", "wall_s", "cpu_s", "peak_rss_mb", "kl", "jsd", "ce")
    medians = {}
    for tool, signal in RUNS:
        mine = [r for r in runs if (r.tool, r.signal) == (tool, signal)]
        if mine:
            medians[f"{tool}:{signal}"] = {key: statistics.median(getattr(r, key) for r in mine) for key in keys}
    cases = {}
    for case, (ours_key, theirs_key, step_target, rss_target) in CASES.items():
        ours, theirs = medians.get(":".join(ours_key)), medians.get(":".join(theirs_key))
        if ours is None or theirs is None:
            continue
        ratios = {key: ours[key] / theirs[key] for key in ("s_per_step", "steady_s_per_step", "wall_s", "peak_rss_mb")}
        ratios["kl_rel_diff"] = (ours["kl"] - theirs["kl"]) / theirs["kl"]
        targets = {f"kl <= TRL + {TARGET_KL:.0%}": ratios["kl_rel_diff"] <= TARGET_KL}
        if step_target:
            targets[f"s/step <= {step_target}x TRL"] = ratios["s_per_step"] <= step_target
        if rss_target:
            targets[f"peak RSS <= {rss_target}x TRL"] = ratios["peak_rss_mb"] <= rss_target
        cases[case] = {"lmforge": ours_key[1], "trl": theirs_key[1], "ratios": ratios, "targets": targets}
    return {"medians": medians, "cases": cases}


def print_table(summary: dict, scores: dict) -> None:
    medians = summary["medians"]
    head = (
        f"{'run (median)':<20} {'s/step':>7} {'steady':>7} {'wall s':>7} {'RSS MB':>7} {'KL':>7} {'JSD':>7} {'CE':>7}"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for name, m in medians.items():
        print(
            f"{name:<20} {m['s_per_step']:7.2f} {m['steady_s_per_step']:7.2f} {m['wall_s']:7.1f} "
            f"{m['peak_rss_mb']:7.0f} {m['kl']:7.4f} {m['jsd']:7.4f} {m['ce']:7.4f}"
        )
    untrained = scores["untrained_student"]
    print(f"{'untrained student':<20} {'':>31} {untrained['kl']:7.4f} {untrained['jsd']:7.4f} {untrained['ce']:7.4f}")
    print(f"{'teacher':<20} {'':>47} {scores['teacher_ce']:7.4f}")
    print(f"\n{'case: lmforge/TRL':<26} {'s/step':>7} {'steady':>7} {'wall':>7} {'RSS':>7} {'KL diff':>8}  targets")
    for case, row in summary["cases"].items():
        r = row["ratios"]
        verdicts = ", ".join(f"{name}: {'MET' if ok else 'NOT met'}" for name, ok in row["targets"].items())
        print(
            f"{case + ' (' + row['lmforge'] + '/' + row['trl'] + ')':<26} {r['s_per_step']:6.2f}x "
            f"{r['steady_s_per_step']:6.2f}x {r['wall_s']:6.2f}x {r['peak_rss_mb']:6.2f}x {r['kl_rel_diff']:+7.1%}  "
            + verdicts
        )


def print_checks(checks: dict, divisors: dict) -> None:
    print("\nGKD loss on fixed logits (TRL's own compute_loss / generalized_jsd_loss; lmforge's distill_loss):")
    print(f"{'':<16} {'TRL trained':>12} {'TRL fn(T)':>12} {'lmforge':>12} {'lmforge/T^2':>12}")
    for name, v in checks["temperature"].items():
        values = [v.get(k, math.nan) for k in ("trl_trained", "trl_function", "lmforge", "lmforge_over_t2")]
        print(f"{name:<16} " + " ".join(f"{value:12.6f}" for value in values))
    print("on-policy, TRL on fixed logits: " + json.dumps(checks["on_policy"]))
    print("on-policy, lmforge (tiny llamas): " + json.dumps(checks["lmforge"].get("on_policy")))
    print("on-policy runs: " + json.dumps(divisors))
    print("verdicts: " + json.dumps(checks["verdicts"]))


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, help="training records (default: steps x batch, one epoch for both)")
    parser.add_argument("--val", type=int, default=32, help="held-out records (default 32)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="optimiser steps (default 20)")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4), cosine to 0")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lmbda", type=float, default=1.0, help="on-policy fraction of the on_policy runs")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="on-policy generation length (both tools)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="runs per kind, order alternating (default 1)")
    parser.add_argument("--teacher", default="default", help="lmforge model reference for the teacher")
    parser.add_argument("--student-layers", type=int, default=14, help="teacher layers the student keeps")
    parser.add_argument(
        "--only", nargs="+", choices=[f"{t}:{s}" for t, s in RUNS], help="run only these (default: all five)"
    )
    parser.add_argument("--lmforge-set", nargs="*", default=[], help="extra key.sub=value overrides for lmforge")
    parser.add_argument(
        "--trl-gradient-checkpointing",
        action="store_true",
        help="TRL with gradient checkpointing (non-reentrant, as lmforge's train.gradient_checkpointing)",
    )
    parser.add_argument(
        "--max-grad-norm",
        type=lambda text: None if text.lower() in ("none", "null", "0") else float(text),
        default=1.0,
        help="global gradient-norm clipping for both tools (default 1.0; none: no clipping, which lmforge's "
        "train.optimizer_in_backward=true needs)",
    )
    parser.add_argument("--peer-venv", type=Path, default=ROOT / "bench" / ".venv-trl")
    parser.add_argument("--lmforge-python", type=Path, default=peers.main_python())
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "distill_vs_trl.json")
    parser.add_argument("--threads", type=int, help="OMP/MKL threads for both tools (default: their own choice)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before a child run is killed")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, students)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.train = args.train or args.steps * args.batch_size
    if min(args.train, args.val, args.batch_size, args.steps, args.repeats, args.max_length) < 1:
        raise SystemExit("--train, --val, --batch-size, --steps, --repeats and --max-length must be >= 1")
    sys.path.insert(0, str(ROOT))
    from lmforge.models.load import resolve_model

    peer = peers.ensure_peer_venv(args.peer_venv, PEER, "trl", SHARED_PINS)
    selected = [run for run in RUNS if not args.only or f"{run[0]}:{run[1]}" in args.only]
    workdir = Path(tempfile.mkdtemp(prefix="distill_vs_trl-"))
    try:
        folders = {"teacher": resolve_model(args.teacher)}
        folders["student"], kept = make_student(folders["teacher"], workdir / "student-init", args.student_layers)
        records, train, val = make_records(args.train, args.val, args.seed)
        (workdir / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        trl_train = trl_order(train, args.steps * args.batch_size, args.seed)
        (workdir / "train.json").write_text(json.dumps(trl_train))
        (workdir / "trl_gkd.py").write_text(TRL_SCRIPT)
        print("checking TRL's GKD loss on fixed logits ...", flush=True)
        checks = loss_checks(peer, workdir)
        runs: list[RunResult] = []
        for repeat in range(args.repeats):
            for tool, signal in selected if repeat % 2 == 0 else selected[::-1]:
                runs.append(run_tool(tool, signal, repeat, args, folders, peer, workdir))
        print("scoring the students on the held-out records ...", flush=True)
        scores = score_all(folders, runs, trl_train[0], val, workdir, args.max_length)
        summary = summarise(runs)
        divisors = on_policy_divisors(runs)
        print_table(summary, scores)
        print_checks(checks, divisors)
        write_report(args, folders, kept, peer, summary, scores, checks, divisors, runs)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def write_report(args, folders, kept, peer, summary, scores, checks, divisors, runs: list[RunResult]) -> None:
    from safetensors import safe_open

    with safe_open(folders["student"] / "model.safetensors", "pt") as handle:
        student_params = sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())  # noqa: SIM118
    for run in runs:  # summarised in `on_policy_divisors` and `scores["tokenisation"]`
        run.extra.pop("divisors", None)
        run.extra.pop("first_example", None)
    report = {
        "benchmark": "distill_vs_trl",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
        | {
            "teacher_folder": str(folders["teacher"]),
            "student_layers_kept": kept,
            "student_params": student_params,
            "records": "dates (train split), prompt/completion",
            "schedule": "cosine, no warmup",
            "objective": {"loss": "jsd", "beta": BETA, "temperature": TEMPERATURE},
            "dtype": "float32",
            "device": "cpu",
        },
        "machine": peers.machine(),
        "versions": {
            "lmforge": {n: importlib.metadata.version(n) for n in ("lmforge", "torch", *SHARED_PINS)},
            "trl": {n: peers.installed_version(peer, n) for n in ("trl", "torch", "datasets", *SHARED_PINS)},
        },
        "summary": summary,
        "scores": scores,
        "trl_loss_checks": checks,
        "trl_on_policy_divisors": divisors,
        "runs": [asdict(run) for run in runs],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")


if __name__ == "__main__":
    sys.exit(main())
