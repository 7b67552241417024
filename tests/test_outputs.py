"""The one output writer (model card, run files) and the one validation loop every trainer shares."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge import config as config_io
from lmforge.finetune.sft import SFTConfig
from lmforge.outputs import CardTable, model_card, write_run_files
from lmforge.train.validation import validation


def test_model_card_renders_title_sentence_sections_and_note():
    card = model_card(
        "run",
        "Made by lmforge.",
        [CardTable(["task", "score"], [["dates", "0.5000"]], "Scores:"), ["", "", "- `a`", "- `b`"]],
        note="See run.json.",
    )
    expected = "# run\n\nMade by lmforge.\n\nScores:\n\n| task | score |\n|---|---|\n| dates | 0.5000 |\n\n"
    assert card == expected + "- `a`\n- `b`\n\nSee run.json.\n"  # a text section's leading blanks are not doubled


def test_run_files_read_back(tmp_path):
    cfg = config_io.load(None, SFTConfig, ["output=out", "data.task=dates", "train.lr=1e-4"])
    log, staging = tmp_path / "log.jsonl", tmp_path / "staging"
    log.write_text('{"step": 1, "loss": 2.0}\n')
    staging.mkdir()
    write_run_files(staging, cfg, {"command": "finetune"}, "# card\n", log)
    assert config_io.load(staging / "lmforge.yaml", SFTConfig) == cfg
    assert json.loads((staging / "run.json").read_text())["command"] == "finetune"
    assert (staging / "log.jsonl").read_text() == log.read_text()
    assert (staging / "README.md").read_text() == "# card\n"
    mergekit = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1e-3}}]}
    write_run_files(staging, mergekit, {}, "")  # plain data (a mergekit config) is written as it is
    assert config_io.read_yaml(staging / "lmforge.yaml") == mergekit


def test_validation_weighs_every_unit_once_not_every_batch():
    """Two batches of 3 and 1 units with per-unit losses 1 and 5: the mean over units is 2, the mean of the
    batch means would be 3. Per-unit metrics (DPO's reward accuracy) are weighted the same way."""
    model = torch.nn.Linear(1, 1)
    rows = [{"units": 1.0, "accurate": 1.0}] * 3 + [{"units": 5.0, "accurate": 0.0}]

    def collate(chunk: list[dict]) -> dict:
        return {"loss": torch.tensor([r["units"] for r in chunk]), "accurate": [r["accurate"] for r in chunk]}

    def loss_fn(_, batch: dict):
        n = len(batch["accurate"])
        return batch["loss"].sum(), {"pairs": n, "accuracy": sum(batch["accurate"]) / n}

    score = validation(rows, collate, loss_fn, batch_size=3, units="pairs", name="loss", means=("accuracy",))
    assert score(model) == pytest.approx({"loss": 2.0, "accuracy": 0.75})
