"""lmforge and lm-eval 0.4.13 on the same task YAMLs over local files, on the same tiny model: prompts and scores.

One task per output type lmforge reads from a task YAML: generate_until with regex filters and k shots (a
GSM8K-like `#### <number>` layout, plus a copy whose answers make exact match score about 1/2), multiple_choice
from a CSV (choices from a template, an int target), loglikelihood, and loglikelihood_rolling; then the first
and the multiple-choice task again with lm-eval's --apply_chat_template and --system_instruction against
lmforge's same flags. Each tool runs in its own process (lm-eval in its own
virtualenv, bench/.venv-lmeval, built as bench/eval_vs_lmeval.py builds it: the CPU torch wheel first). Batch
size 1 on both sides, so padding cannot move a score.

For every record the prompt lmforge builds must equal lm-eval's context string exactly (the text for rolling
perplexity), each generation and filtered answer must be the same, and every metric lm-eval reports must
equal lmforge's: exactly for accuracies and exact match,
to 1e-5 relative for perplexities and bits per byte (the same float32 forward pass, summed in another order).
Figures go to bench/results/lmeval_task_conformance.json; the exit status is 1 on any difference.

Run from the repository root (about a minute once the virtualenv exists; CONFORMANCE_WORK=DIR keeps the
model, task files and both tools' outputs in DIR to inspect):

    .venv/bin/python bench/lmeval_task_conformance.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import peers
import yaml

ROOT = Path(__file__).resolve().parent.parent
PEER = "lm-eval[hf]==0.4.13"
SHARED_PINS = ("transformers", "tokenizers", "accelerate")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TASKS = ("conf_gen", "conf_gen_hits", "conf_mc", "conf_ll", "conf_roll")
CHAT_TASKS = ("conf_gen", "conf_mc")
SYSTEM = "Answer briefly."


def write_tasks(work: Path) -> Path:
    """Data files and the four task YAMLs (absolute data paths, so both tools read the same files)."""
    folder = work / "tasks"
    folder.mkdir()
    gsm = [
        {
            "question": f"Ann has {n} pens and gets {n + 2} more. How many now?",
            "answer": f"{n}+{n + 2}\n#### {2 * n + 2}",
        }
        for n in range(12)
    ]
    (folder / "gsm_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm[:6]))
    (folder / "gsm_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm[6:]))
    (folder / "mc.csv").write_text(
        "question,A,B,C,label\nThe sky is,blue,green,loud,0\nGrass is,pink,green,tall,1\nSnow is,black,tan,white,2\n"
        "Fire is,hot,cold,wet,0\nIce is,warm,cold,red,1\nThe sun is,dark,small,bright,2\n"
    )
    (folder / "ll.jsonl").write_text(
        "".join(
            json.dumps({"context": c, "word": w}) + "\n"
            for c, w in [("The cat sat on the", "mat"), ("One, two,", "three"), ("Paris is in", "France")]
        )
    )
    (folder / "roll.jsonl").write_text(
        "".join(
            json.dumps({"page": p}) + "\n"
            for p in [
                "Rivers carry water to the sea.",
                "A short   text with odd  spacing,\nand a second line.",
                "Numbers like 3.14 and 42 appear here too.",
            ]
        )
    )

    def data(**splits: str) -> dict:
        return {
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {s: str(folder / f) for s, f in splits.items()}},
        }

    configs = {
        "conf_gen": data(train="gsm_train.jsonl", test="gsm_test.jsonl")
        | {
            "training_split": "train",
            "test_split": "test",
            "output_type": "generate_until",
            "doc_to_text": "Question: {{question}}\nAnswer:",
            "doc_to_target": "{{answer.split('####')[-1].strip()}}",
            "num_fewshot": 2,
            "description": "Solve each problem.\n\n",
            "generation_kwargs": {"until": ["Question:", "\n\n"], "max_gen_toks": 12, "do_sample": False},
            "filter_list": [
                {
                    "name": "strict-match",
                    "filter": [
                        {"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"},
                        {"function": "take_first"},
                    ],
                },
                {
                    "name": "first-word",
                    "filter": [
                        {"function": "regex", "regex_pattern": "(\\S+)", "group_select": 0},
                        {"function": "take_first"},
                    ],
                },
            ],
            "metric_list": [
                {
                    "metric": "exact_match",
                    "aggregation": "mean",
                    "higher_is_better": True,
                    "ignore_case": True,
                    "ignore_punctuation": True,
                }
            ],
        },
        "conf_mc": {"dataset_path": "csv", "dataset_kwargs": {"data_files": {"test": str(folder / "mc.csv")}}}
        | {
            "test_split": "test",
            "fewshot_split": "test",
            "num_fewshot": 1,
            "output_type": "multiple_choice",
            "doc_to_text": "Q: {{question}}\nA:",
            "doc_to_choice": "{{[A, B, C]}}",
            "doc_to_target": "label",
            "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
        },
        "conf_ll": data(validation="ll.jsonl")
        | {
            "validation_split": "validation",
            "output_type": "loglikelihood",
            "doc_to_text": "context",
            "doc_to_target": "{{' ' + word}}",
        },
        "conf_roll": data(test="roll.jsonl")
        | {
            "test_split": "test",
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "page",
            "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}],
        },
    }
    for name, config in configs.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **config}, sort_keys=False))
    return folder


def add_hits_task(model: Path, folder: Path, probe: Path) -> None:
    """conf_gen with answers that are, for every other record, the first word the model really generates.

    A random model never answers right, so exact match would compare 0 with 0; these answers make it score
    about one half under the first-word filter. The test answers are not in any prompt (shots come from the
    train split), so the prompts stay those of conf_gen.
    """
    run_lmforge(model, folder, ("conf_gen",), probe, chat=False)
    rows = [json.loads(x) for x in (probe / "samples_conf_gen.jsonl").read_text().splitlines() if x]
    test = [json.loads(x) for x in (folder / "gsm_test.jsonl").read_text().splitlines() if x]
    for index, (record, row) in enumerate(zip(test, rows, strict=True)):
        if index % 2 == 0 and row["filtered"]["first-word"] != "[invalid]":
            record["answer"] = f"worked answer\n#### {row['filtered']['first-word']}"
    (folder / "gsm_test_hits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    config = yaml.safe_load((folder / "conf_gen.yaml").read_text())
    config["task"] = "conf_gen_hits"
    config["dataset_kwargs"]["data_files"]["test"] = str(folder / "gsm_test_hits.jsonl")
    (folder / "conf_gen_hits.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def run_lmeval(lm_eval: Path, model: Path, folder: Path, tasks: tuple[str, ...], out: Path, chat: bool) -> None:
    command = [str(lm_eval), "run", "--model", "hf", "--model_args", f"pretrained={model},dtype=float32"]
    command += ["--tasks", ",".join(tasks), "--include_path", str(folder), "--device", "cpu", "--batch_size", "1"]
    command += ["--output_path", str(out), "--log_samples"]
    command += ["--apply_chat_template", "--system_instruction", SYSTEM] if chat else []
    env = os.environ | OFFLINE | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"lm-eval failed:\n{done.stderr[-3000:]}")


def run_lmforge(model: Path, folder: Path, tasks: tuple[str, ...], out: Path, chat: bool) -> None:
    command = [sys.executable, "-m", "lmforge.cli", "eval", str(model), "--batch-size", "1", "--no-footprint"]
    command += [a for t in tasks for a in ("--task", str(folder / f"{t}.yaml"))] + ["--out", str(out)]
    command += ["--apply-chat-template", "--system-instruction", SYSTEM] if chat else []
    done = subprocess.run(command, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"lmforge failed:\n{done.stderr[-3000:]}")


def lmeval_rows(out: Path, task: str) -> tuple[dict, list[dict]]:
    results = json.loads(max(out.rglob("results_*.json"), key=lambda p: p.stat().st_mtime).read_text())
    samples = max(out.rglob(f"samples_{task}_*.jsonl"), key=lambda p: p.stat().st_mtime)
    rows = sorted((json.loads(line) for line in samples.read_text().splitlines() if line), key=lambda r: r["doc_id"])
    return results["results"][task], rows  # one row per record and filter


def compare(task: str, ours: dict, our_rows: list[dict], theirs: dict, their_rows: list[dict]) -> dict:
    """Prompt, generation, filter and metric differences of one task."""
    filter_rows = len(their_rows)
    filtered_equal = sum(
        row["filtered_resps"][0] == our_rows[row["doc_id"]]["filtered"][row["filter"]]
        and row["resps"][0][0] == our_rows[row["doc_id"]]["output"]
        for row in their_rows
        if "filtered" in our_rows[row["doc_id"]]
    )
    their_rows = [row for row in their_rows if row["filter"] == their_rows[0]["filter"]]
    their_prompts = [row["arguments"]["gen_args_0"]["arg_0"] for row in their_rows]
    our_prompts = [row["target"] if "loglikelihood" in row and "input" not in row else row["input"] for row in our_rows]
    prompts_equal = sum(a == b for a, b in zip(our_prompts, their_prompts, strict=True))
    metrics = {}
    for key, value in theirs.items():
        if "," not in key or "_stderr" in key:
            continue
        mine = ours.get(key)
        exact = key.split(",")[0] in ("acc", "acc_norm", "exact_match")
        same = mine is not None and (mine == value if exact else math.isclose(mine, value, rel_tol=1e-5))
        metrics[key] = {"lmforge": mine, "lm_eval": value, "equal": same}
    return {
        "records": len(their_rows),
        "prompts_equal": prompts_equal,
        "generations_and_filtered_answers_equal": filtered_equal if "filtered" in our_rows[0] else None,
        "first_prompt_difference": next(
            ({"lmforge": a, "lm_eval": b} for a, b in zip(our_prompts, their_prompts, strict=True) if a != b), None
        ),
        "metrics": metrics,
        "conforms": prompts_equal == len(their_rows)
        and all(m["equal"] for m in metrics.values())
        and bool(metrics)
        and (filtered_equal == filter_rows if "filtered" in our_rows[0] else True),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-venv", type=Path, default=ROOT / "bench" / ".venv-lmeval")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lmeval_task_conformance.json")
    args = parser.parse_args(argv)
    lm_eval = peers.ensure_peer_venv(args.peer_venv, PEER, "lm_eval", SHARED_PINS).parent / "lm_eval"
    from lmforge.models.tiny import make_tiny_llama

    report: dict = {"lm_eval": PEER, "model": "tiny random llama (lmforge.models.tiny, seed 0)", "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(os.environ.get("CONFORMANCE_WORK") or tmp)
        model = make_tiny_llama(work / "model", seed=0)
        folder = write_tasks(work)
        add_hits_task(model, folder, work / "probe")
        for label, tasks, chat in (("plain", TASKS, False), ("chat_template", CHAT_TASKS, True)):
            theirs_out, ours_out = work / f"lmeval_{label}", work / f"lmforge_{label}"
            run_lmeval(lm_eval, model, folder, tasks, theirs_out, chat)
            run_lmforge(model, folder, tasks, ours_out, chat)
            ours = json.loads((ours_out / "results.json").read_text())["results"]
            for task in tasks:
                our_rows = [json.loads(x) for x in (ours_out / f"samples_{task}.jsonl").read_text().splitlines() if x]
                theirs, their_rows = lmeval_rows(theirs_out, task)
                report["runs"][f"{label}/{task}"] = compare(task, ours[task], our_rows, theirs, their_rows)
    ok = all(run["conforms"] for run in report["runs"].values())
    report["conforms"] = ok
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, run in report["runs"].items():
        flags = ", ".join(f"{k}={v['lmforge']!r}/{v['lm_eval']!r}" for k, v in run["metrics"].items())
        print(f"{name}: prompts {run['prompts_equal']}/{run['records']} equal; {flags}; conforms={run['conforms']}")
    print(f"report in {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
