"""DPO on a tiny llama: the losses against the paper formulas, the frozen reference, step 0, a short run, bad inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmforge import config as config_io
from lmforge.errors import UserError
from lmforge.finetune.dpo import (
    DPO_LOSSES,
    DPOConfig,
    add_reference_logprobs,
    collate_pairs,
    dpo_loss,
    make_loss_fn,
    run_dpo,
    tokenize_pairs,
)
from lmforge.finetune.lora import LoraSettings, attach_lora
from lmforge.models.load import load_model
from lmforge.train.chunked import sequence_logprobs


def _naive_dpo(pc, pr, rc, rr, beta, loss_type):
    """The paper formulas written out element by element in plain Python floats."""
    out = []
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), strict=True):
        h = (a - c) - (b - d)  # log-ratio of chosen minus log-ratio of rejected
        out.append(math.log(1 + math.exp(-beta * h)) if loss_type == "sigmoid" else (h - 1 / (2 * beta)) ** 2)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("loss_type", sorted(DPO_LOSSES))
@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 2.0])
def test_losses_match_the_paper_formulas(loss_type, beta):
    generator = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-20 * torch.rand(6, generator=generator, dtype=torch.float64) for _ in range(4))
    got = dpo_loss(pc, pr, rc, rr, beta, loss_type)
    torch.testing.assert_close(got, _naive_dpo(pc, pr, rc, rr, beta, loss_type))


def test_losses_pinned_by_hand():
    # h = (-1 - -2) - (-3 - -2) = 1 - (-1) = 2
    args = [torch.tensor([x]) for x in (-1.0, -3.0, -2.0, -2.0)]
    # sigmoid, beta 0.5: -log sigmoid(1) = log(1 + e^-1) = 0.31326169
    torch.testing.assert_close(dpo_loss(*args, beta=0.5), torch.tensor([0.31326169]))
    # ipo, beta 0.5: (2 - 1)^2 = 1; beta 0.25: (2 - 2)^2 = 0
    torch.testing.assert_close(dpo_loss(*args, beta=0.5, loss_type="ipo"), torch.tensor([1.0]))
    torch.testing.assert_close(dpo_loss(*args, beta=0.25, loss_type="ipo"), torch.tensor([0.0]))
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(*args, beta=0.0)


PAIRS = [
    {"prompt": f"Is {n} even?", "chosen": "yes" if n % 2 == 0 else "no", "rejected": "maybe, who knows"}
    for n in range(16)
]


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return load_model(tiny_llama, device="cpu")


def test_sequence_logprobs_match_full_logits(tiny):
    rows = tokenize_pairs(PAIRS[:3], tiny.tokenizer, 64)
    batch = collate_pairs(rows, tiny.tokenizer.pad_token_id)
    with torch.no_grad():
        got = sequence_logprobs(tiny.model, batch, chunk_size=3)
        logits = tiny.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert got.shape == (6,)
    for i in range(6):  # one row at a time, one position at a time
        want = sum(
            torch.log_softmax(logits[i, t].double(), -1)[batch["labels"][i, t + 1]].item()
            for t in range(batch["labels"].shape[1] - 1)
            if batch["labels"][i, t + 1] != -100
        )
        assert abs(got[i].item() - want) < 1e-4


def test_reference_is_the_base_and_step_zero_loss_is_ln2(tiny_llama, tiny):
    rows = tokenize_pairs(PAIRS[:4], tiny.tokenizer, 64)
    pad = tiny.tokenizer.pad_token_id
    with torch.no_grad():
        base = sequence_logprobs(tiny.model, collate_pairs(rows, pad))
    torch.manual_seed(0)
    model = attach_lora(load_model(tiny_llama, device="cpu").model, LoraSettings(r=4))
    with torch.no_grad():  # a random-but-nonzero adapter, so "disabled" is really tested
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    scored = add_reference_logprobs(model, rows, pad, batch_size=3)
    ref = torch.tensor([r["ref_chosen"] for r in scored] + [r["ref_rejected"] for r in scored])
    torch.testing.assert_close(ref, base, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert (sequence_logprobs(model, collate_pairs(rows, pad)) - base).abs().max() > 1e-2  # adapter on differs
    with torch.no_grad():
        batch = collate_pairs(scored, pad)
        policy = sequence_logprobs(model, batch)
        tokens = (batch["labels"][:, 1:] != -100).sum(-1)
        for loss_type, scale in [("sigmoid", 1), ("ipo", tokens)]:  # IPO averages log-probs per token, as TRL
            p, r = policy / scale, ref / scale
            want = _naive_dpo(p[:4], p[4:], r[:4], r[4:], 0.1, loss_type).sum().item()
            assert make_loss_fn(0.1, loss_type)(model, batch)[0].item() == pytest.approx(want, rel=1e-4)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()  # a fresh adapter: policy == reference
        for loss_type, expected in [("sigmoid", math.log(2)), ("ipo", (1 / (2 * 0.1)) ** 2)]:
            loss, metrics = make_loss_fn(0.1, loss_type)(model, collate_pairs(scored, pad))
            assert abs(loss.item() - 4 * expected) < 1e-4 * expected and metrics["reward_accuracy"] == 0.0


def _cfg(tiny_llama, tmp_path, *overrides):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    base = [
        f"model={tiny_llama}",
        f"output={tmp_path / 'out'}",
        f"data.path={data}",
        "data.val_fraction=0.25",
        "train.max_steps=5",
        "train.batch_size=4",
        "train.lr=1e-2",
        "train.schedule=constant",
        "lora.r=4",
        "eval.probe=false",
    ]
    return config_io.load(None, DPOConfig, base + list(overrides))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_short_run_learns_the_preference_and_writes_outputs(tiny_llama, tmp_path, loss_type):
    out = run_dpo(_cfg(tiny_llama, tmp_path, f"loss_type={loss_type}"))
    record = json.loads((out / "run.json").read_text())
    assert record["command"] == "finetune" and record["method"] == f"dpo-{loss_type}"
    assert 0 < record["params_trainable"] < record["params_total"]
    train_pairs = record["preference"]["train"]
    start = math.log(2) if loss_type == "sigmoid" else (1 / (2 * 0.1)) ** 2  # policy == reference at step 0
    assert train_pairs["loss"] < start and train_pairs["reward_accuracy"] > 0.5 and train_pairs["reward_margin"] > 0
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps if "loss" in s]
    assert len(losses) == 5 and abs(losses[0] - start) < 1e-4 * start and losses[-1] < losses[0]
    assert all(s["tokens"] == 4 for s in steps if "loss" in s)  # the loop counted pairs, not tokens
    for name in ("adapter_config.json", "adapter_model.safetensors", "lmforge.yaml", "README.md"):
        assert (out / name).is_file()
    assert config_io.load(out / "lmforge.yaml", DPOConfig).beta == 0.1
    assert not (tmp_path / "out.work").exists()


def test_full_dpo_takes_the_reference_before_training_and_moves_every_weight(tiny_llama, tmp_path):
    base = load_model(tiny_llama, device="cpu").model.state_dict()
    out = run_dpo(_cfg(tiny_llama, tmp_path, "method=full", "train.lr=1e-3"))
    record = json.loads((out / "run.json").read_text())
    assert record["params_trainable"] == record["params_total"]
    train_pairs = record["preference"]["train"]
    assert train_pairs["loss"] < math.log(2) and train_pairs["reward_margin"] > 0  # step 0 was ln 2: ref == policy
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert abs(next(s["loss"] for s in steps if "loss" in s) - math.log(2)) < 1e-4
    tuned = load_model(out, device="cpu").model.state_dict()
    assert not (out / "adapter_config.json").exists()
    assert all(not torch.equal(tuned[k], base[k]) for k in base if k.endswith("q_proj.weight"))


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["beta=0"], "beta must be > 0"),
        (["beta=-1"], "beta must be > 0"),
        (["data.path=null"], "data.path is required"),
        (["data.format=prompt_completion", "data.columns={completion: chosen}"], "not preference pairs"),
    ],
)
def test_bad_inputs(tiny_llama, tmp_path, overrides, fragment):
    with pytest.raises(UserError) as err:
        run_dpo(_cfg(tiny_llama, tmp_path, *overrides))
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
