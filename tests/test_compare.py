"""`lmforge compare`: rows joined from eval runs and the runs that made their models, deltas, verdicts.

The run folders are written here by hand in the run-record schema, so every number is known; the first
test recomputes the score and cost tables straight from the run.json files.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from lmforge import cli
from lmforge.errors import UserError
from lmforge.recipe.select import select_best
from lmforge.report.compare import compare

BASE = {"dates": 0.0, "extraction": 0.05, "probe": 14.0}
MODELS = {
    # name: (command, method, data task, scores, params, ms/token, wall_s, peak_rss, input names)
    "expert_dates": ("finetune", "sft-lora", "dates", {"dates": 0.95, "extraction": 0.05, "probe": 14.5}, 135e6, 70,
                     100.0, 2.6e9, ["base_model"]),
    "expert_extraction": ("finetune", "sft-lora", "extraction", {"dates": 0.0, "extraction": 0.9, "probe": 16.0},
                          135e6, 70, 110.0, 2.7e9, ["base_model"]),
    "merge_good": ("merge", "ties", None, {"dates": 0.85, "extraction": 0.80, "probe": 14.9}, 135e6, 70, 20.0, 0.9e9,
                   ["expert_dates", "expert_extraction"]),
    "merge_bad": ("merge", "linear", None, {"dates": 0.3, "extraction": 0.7, "probe": 14.2}, 135e6, 70, 15.0, 0.8e9,
                  ["expert_dates", "expert_extraction"]),
    "student": ("distill", "forward_kl", None, {"dates": 0.8, "extraction": 0.75, "probe": 18.0}, 78e6, 40, 300.0,
                3.1e9, ["merge_good"]),
}  # fmt: skip


def metrics(scores: dict, n: int = 40) -> dict:
    out = {}
    for task, value in scores.items():
        if task == "probe":
            out[task] = {
                "perplexity": {"value": value, "stderr": None},
                "bits_per_byte": {"value": 0.9, "stderr": None},
            }
        else:
            out[task] = {"exact_match": {"value": value, "stderr": (value * (1 - value) / n) ** 0.5}}
    return out


def eval_run(folder: Path, model_folder: Path, scores: dict, params: float, ms: float) -> Path:
    footprint = {"params_total": int(params), "size_bytes": int(params * 4), "ms_per_token": ms,
                 "peak_rss_bytes": int(1.5e9), "load_s": 1.0, "prompt_tokens_per_s": 500.0}  # fmt: skip
    folder.mkdir(parents=True)
    record = {
        "command": "eval",
        "method": "evaluate",
        "inputs": {"model": {"ref": str(model_folder), "folder": str(model_folder)}},
        "metrics": metrics(scores) | {"footprint": footprint},
        "wall_s": 60.0,
        "params_total": int(params),
        "size_bytes": int(params * 4),
    }
    (folder / "run.json").write_text(json.dumps(record))
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Model folders with the run.json of the command that made them, and an eval run of each (read-only)."""
    tmp_path = tmp_path_factory.mktemp("runs")
    base_model = tmp_path / "models" / "default"
    base_model.mkdir(parents=True)
    folders = {"base_model": base_model}
    evals = {"base": eval_run(tmp_path / "eval" / "base", base_model, BASE, 135e6, 70)}
    for name, (command, method, task, scores, params, ms, wall, rss, inputs) in MODELS.items():
        folder = tmp_path / "models" / name
        folder.mkdir()
        folders[name] = folder
        named = [{"ref": str(folders[i]), "folder": str(folders[i])} for i in inputs]
        record = {
            "command": command,
            "method": method,
            "inputs": {"teacher": named[0]} if command == "distill" else {"models": named},
            "data": {"task": task},
            "wall_s": wall,
            "cpu_s": wall * 1.8,
            "peak_rss_bytes": int(rss),
            "tokens_seen": 5000 if command != "merge" else 0,
            "params_total": int(params),
            "metrics": {},
        }
        (folder / "run.json").write_text(json.dumps(record))
        (folder / "log.jsonl").write_text(
            "".join(json.dumps({"step": s, "loss": 1.0 / s, "elapsed_s": s}) + "\n" for s in range(1, 5))
        )
        evals[name] = eval_run(tmp_path / "eval" / name, folder, scores, params, ms)
    return evals


def specs(runs: dict[str, Path]) -> list[str]:
    return [f"base={runs['base']}"] + [str(runs[name]) for name in MODELS]


def test_table_recomputed_from_run_json(runs):
    comparison = compare(specs(runs), baseline="base")
    scores, costs = comparison.tables[0], comparison.tables[1]
    base = json.loads((runs["base"] / "run.json").read_text())["metrics"]
    assert [row[0] for row in scores.rows] == ["base", *MODELS]
    for row, name in zip(scores.rows, ["base", *MODELS], strict=True):
        record = json.loads((runs[name] / "run.json").read_text())
        for task, cell in zip(["dates", "extraction", "probe"], row[2:], strict=True):
            metric = "perplexity" if task == "probe" else "exact_match"
            value, ref = record["metrics"][task][metric]["value"], base[task][metric]["value"]
            digits = 2 if task == "probe" else 3
            expected = f"{value:.{digits}f}" + ("" if name == "base" else f" ({value - ref:+.{digits}f})")
            assert cell == expected
        if name != "base":  # cost to make comes from the run.json in the model folder
            made = json.loads((Path(record["inputs"]["model"]["folder"]) / "run.json").read_text())
            cost_row = costs.rows[[r[0] for r in costs.rows].index(name)]
            wall = made["wall_s"]
            assert cost_row[5] == (f"{wall:.0f} s" if wall < 120 else f"{wall / 60:.1f} min")
            assert cost_row[7] == f"{made['peak_rss_bytes'] / 2**20:,.0f} MiB"
            assert cost_row[1] == f"{record['metrics']['footprint']['params_total'] / 1e6:.1f} M"


def test_verdicts_say_plainly_what_paid_off(runs):
    comparison = compare(specs(runs), baseline="base")
    verdicts = comparison.verdicts
    assert verdicts["expert_dates"] == "paid off: dates +0.950"
    assert verdicts["expert_extraction"] == "paid off: extraction +0.850, but probe perplexity rose +14.3% (forgetting)"
    assert verdicts["merge_good"].startswith("paid off: one model keeps >= 80%")
    assert verdicts["merge_bad"] == "did not pay off: keeps only 32% of expert_dates's dates gain"
    assert verdicts["student"].startswith("paid off: keeps >= 90% of the teacher's score")
    assert verdicts["student"].endswith("but probe perplexity rose +28.6% (forgetting)")  # 18.0 vs 14.0
    detail = {row[0]: row for row in comparison.tables[3].rows}
    assert "keeps 89% of expert_dates's dates gain" in detail["merge_good"][5]  # 0.85 / 0.95
    assert "keeps 88% of expert_extraction's extraction gain" in detail["merge_good"][5]  # 0.75 / 0.85
    assert "0.58x the teacher's parameters, 1.75x its generation speed" in detail["student"][5]
    summary = {row[0]: row[1:] for row in comparison.tables[2].rows}
    assert summary["did it pay off here?"][2] == "1 of 2 paid off (merge_good)"
    assert summary["compute cost: wall time to make"][0] == "100 s - 110 s"


def test_a_gain_within_noise_does_not_pay_off(runs, tmp_path):
    changed = tmp_path / "expert_dates"
    shutil.copytree(runs["expert_dates"], changed)
    record = json.loads((changed / "run.json").read_text())
    record["metrics"]["dates"]["exact_match"] = {"value": 0.05, "stderr": 0.03}
    (changed / "run.json").write_text(json.dumps(record))
    verdict = compare(specs(runs | {"expert_dates": changed}), baseline="base").verdicts["expert_dates"]
    assert verdict.startswith("did not pay off: dates +0.050 is within noise")


def test_a_student_that_loses_general_text_does_not_pay_off(runs, tmp_path):
    changed = tmp_path / "student"
    shutil.copytree(runs["student"], changed)
    record = json.loads((changed / "run.json").read_text())
    record["metrics"]["probe"]["perplexity"]["value"] = 14.9 * 2.5  # the teacher (merge_good) has 14.9
    (changed / "run.json").write_text(json.dumps(record))
    comparison = compare(specs(runs | {"student": changed}), baseline="base")
    assert comparison.verdicts["student"] == "did not pay off: probe perplexity 2.5x the teacher's (> 2x)"  # said once
    detail = {row[0]: row for row in comparison.tables[3].rows}
    assert "probe perplexity 2.50x the teacher's" in detail["student"][5]


def test_a_making_run_alone_is_a_row_and_the_baseline_defaults_to_the_first(runs, tmp_path):
    made = json.loads((runs["expert_dates"] / "run.json").read_text())["inputs"]["model"]["folder"]
    comparison = compare([str(runs["base"]), made])
    assert comparison.baseline == "default" and [r.label for r in comparison.rows] == ["default", "expert_dates"]
    assert comparison.rows[1].cost["wall_s"] == 100.0 and comparison.rows[1].curve


def test_bad_inputs(runs, tmp_path):
    with pytest.raises(UserError, match="'nope' is not a row: use one of base, expert_dates"):
        compare(specs(runs)[:2], baseline="nope")
    with pytest.raises(UserError, match="has no run.json"):
        compare([str(tmp_path)])


def test_select_best_by_worst_task(runs, tmp_path):
    chosen = select_best(
        [str(runs["merge_bad"]), str(runs["merge_good"])], ["dates", "extraction"], "min", tmp_path / "s"
    )
    assert chosen.name == "merge_good"
    record = json.loads((tmp_path / "s" / "run.json").read_text())
    assert record["command"] == "select" and record["chosen"] == str(chosen)
    with pytest.raises(UserError, match="higher-is-better"):
        select_best([str(runs["merge_bad"])], ["probe"], "mean", tmp_path / "t")


def test_cli_compare_writes_the_report(monkeypatch, capsys, runs, tmp_path):
    out = tmp_path / "report"
    monkeypatch.setattr(sys, "argv", ["lmforge", "compare", *specs(runs), "--baseline", "base", "--out", str(out)])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "score per task" in printed and "merge_bad" in printed and "fine-tuning vs distillation" in printed
    assert {p.name for p in out.iterdir()} >= {"report.md", "report.html", "plots", "comparison.json", "run.json"}
    markdown = (out / "report.md").read_text()
    assert "| merge_bad | linear | 0.300 (+0.300) |" in markdown


def test_an_edit_that_costs_general_text_did_not_pay_off(runs, tmp_path):
    """An edit removes one behaviour: its margin must fall AND probe perplexity stay within +10% of the base."""
    specs = [f"base={runs['base']}"]
    for name, probe in (("edit_gentle", 14.5), ("edit_harsh", 16.8)):  # +3.6% and +20% against 14.0
        folder = tmp_path / "models" / name
        folder.mkdir(parents=True)
        record = {"command": "edit", "method": "profs", "inputs": {"model": {"ref": "default"}}, "wall_s": 20.0,
                  "peak_rss_bytes": int(1e9), "preference": {"pairs": 16, "margin_before": -3.2, "margin_after": -9.5},
                  "metrics": {}}  # fmt: skip
        (folder / "run.json").write_text(json.dumps(record))
        specs.append(str(eval_run(tmp_path / "eval" / name, folder, {**BASE, "probe": probe}, 135e6, 70)))
    verdicts = compare(specs, baseline="base").verdicts
    assert verdicts["edit_gentle"] == "paid off: log p(rejected) - log p(chosen) on 16 of its pairs -3.20 -> -9.50"
    harsh = "did not pay off: probe perplexity rose +20.0% (> +10%) while log p(rejected) - log p(chosen) on 16"
    assert verdicts["edit_harsh"].startswith(harsh)
