"""lmforge's evaluation harness side by side with EleutherAI lm-evaluation-harness (lm-eval 0.4.13).

Measures, on the same model folder and the same records, two workloads with each tool in its own subprocess:

- `probe`: perplexity (rolling log-likelihood) on lmforge's general text probe (`lmforge.data.probe`):
  bits_per_byte, byte_perplexity (and word_perplexity, derived for lmforge from its per-document samples);
- `dates`: greedy generation on the first N test records of the built-in `dates` task with the tokenizer's
  chat template: exact_match, and how many of the N generated texts are identical between the tools.

For each run: wall seconds, peak RSS of the child process (os.wait4), CPU seconds, and the scoring time alone
(no interpreter start-up, model or data loading): lmforge's per-task seconds from results.json, lm-eval's span
from "Running ... requests" to "Saving results aggregated" in its log (1 s resolution). Each pair of runs is
repeated `--repeats` times in alternating order; medians are reported, with ratios lm-eval / lmforge for time
and lmforge / lm-eval for memory. Figures go to bench/results/eval_vs_lmeval.json.

On a shared machine pass `--threads 1`: while another busy process shares the cores, torch's default of one
OpenMP thread per core oversubscribes them and greedy decoding (many small ops, each a thread barrier) slows
down by up to 10x (seen on a 2-core machine: 300 s instead of 37 s for 50 `dates` prompts).

lm-eval is installed into its own virtualenv (bench/.venv-lmeval, created if missing: the CPU torch wheel first,
then lm-eval[hf]==0.4.13 with transformers, tokenizers and accelerate pinned to the versions lmforge runs on, so
the comparison is between harnesses, not library releases). It runs offline on custom task YAMLs in a temporary
--include_path folder that read the records from local jsonl files.

Run from the repository root:

    .venv/bin/python bench/eval_vs_lmeval.py [--limit 50 --repeats 1]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import peers

ROOT = Path(__file__).resolve().parent.parent
PEER = "lm-eval[hf]==0.4.13"
SHARED_PINS = ("transformers", "tokenizers", "accelerate")  # pinned in the peer venv to lmforge's versions
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@dataclass
class Workload:
    """One scoring job, expressed for both tools."""

    name: str
    lmforge_task: str
    lmeval_task: str
    limit: int | None
    chat: bool


@dataclass
class RunResult:
    """What one child process cost, and the metrics it reported."""

    tool: str
    workload: str
    repeat: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    scoring_s: float | None = None
    load_1m_before: float | None = None
    metrics: dict = field(default_factory=dict)


# ---------------------------------------------------------------- setup


def write_records(workdir: Path, limit: int) -> dict[str, list[dict]]:
    """The records both tools score, written as jsonl for lm-eval; returns them by workload."""
    from lmforge.data import probe, synthetic

    records = {
        "probe": [{"text": text} for text in probe.general_text()],
        "dates": synthetic.examples("dates", "test")[:limit],
    }
    for name, rows in records.items():
        with open(workdir / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
    return records


def write_lmeval_tasks(workdir: Path) -> Path:
    """Task YAMLs (JSON is YAML) reading the local jsonl files; returns the --include_path folder.

    Stop strings and the token budget are those of lmforge's `dates` task (\\n, 32 tokens).
    """
    from lmforge.eval.tasks import get_task

    lmforge_dates = get_task("dates")
    folder = workdir / "lmeval_tasks"
    folder.mkdir()

    def data(name: str) -> dict:
        files = {"test": str(workdir / f"{name}.jsonl")}
        return {"dataset_path": "json", "dataset_kwargs": {"data_files": files}, "test_split": "test"}

    probe = {
        "task": "lmforge_probe",
        **data("probe"),
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "num_fewshot": 0,
        "metric_list": [
            {"metric": metric, "aggregation": aggregation, "higher_is_better": False}
            for metric, aggregation in (
                ("word_perplexity", "weighted_perplexity"),
                ("byte_perplexity", "weighted_perplexity"),
                ("bits_per_byte", "bits_per_byte"),
            )
        ],
    }
    dates = {
        "task": "lmforge_dates",
        **data("dates"),
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "num_fewshot": 0,
        "generation_kwargs": {
            "until": list(lmforge_dates.stop),
            "do_sample": False,
            "max_gen_toks": lmforge_dates.max_new_tokens,
        },
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }
    for config in (probe, dates):
        (folder / f"{config['task']}.yaml").write_text(json.dumps(config, indent=2))
    return folder


# ---------------------------------------------------------------- measuring


def lmforge_command(python: Path, folder: Path, work: Workload, out: Path, batch_size: int) -> list[str]:
    command = [str(python), "-m", "lmforge.cli", "eval", str(folder), "--task", work.lmforge_task]
    command += ["--batch-size", str(batch_size), "--dtype", "float32", "--out", str(out), "--overwrite"]
    command += ["--no-footprint"]
    return command + (["--limit", str(work.limit)] if work.limit else [])


def lmeval_command(lm_eval: Path, folder: Path, work: Workload, tasks: Path, out: Path, batch_size: int) -> list[str]:
    command = [str(lm_eval), "run", "--model", "hf", "--model_args", f"pretrained={folder},dtype=float32"]
    command += ["--tasks", work.lmeval_task, "--include_path", str(tasks), "--device", "cpu"]
    command += ["--batch_size", str(batch_size), "--output_path", str(out), "--log_samples"]
    return command + (["--apply_chat_template"] if work.chat else [])


def read_lmforge(out: Path, task: str, log: Path) -> tuple[dict, list[dict], float]:
    """Metrics, per-sample rows and the harness's own scoring seconds from an lmforge output folder."""
    results = json.loads((out / "results.json").read_text())
    rows = [json.loads(line) for line in (out / f"samples_{task}.jsonl").read_text().splitlines() if line]
    metrics = {k.split(",")[0]: v for k, v in results["results"][task].items() if "," in k and "_stderr" not in k}
    return metrics, rows, results["configs"][task]["seconds"]


def read_lmeval(out: Path, task: str, log: Path) -> tuple[dict, list[dict], float]:
    """Metrics, per-sample rows (by doc_id) and scoring seconds from an lm-eval output folder and log.

    lm-eval's own total_evaluation_time_seconds starts before the model loads, so the scoring span is read
    from its log's timestamps instead.
    """
    results = json.loads(max(out.rglob("results_*.json"), key=lambda p: p.stat().st_mtime).read_text())
    samples_file = max(out.rglob(f"samples_{task}_*.jsonl"), key=lambda p: p.stat().st_mtime)
    rows = sorted((json.loads(line) for line in samples_file.read_text().splitlines() if line), key=_doc_id)
    metrics = {k.split(",")[0]: v for k, v in results["results"][task].items() if "," in k and "_stderr" not in k}
    return metrics, rows, _logged_span(log.read_text(errors="replace"))


_LOG_TIME = r"^(\d{4}-\d\d-\d\d:\d\d:\d\d:\d\d) "


def _logged_span(log: str) -> float:
    """Seconds from lm-eval's first "Running <type> requests" line to its "Saving results aggregated" line."""
    start = re.search(_LOG_TIME + r".*Running \w+ requests", log, re.MULTILINE)
    end = re.search(_LOG_TIME + r".*Saving results aggregated", log, re.MULTILINE)
    if not (start and end):
        return math.nan
    stamps = [time.mktime(time.strptime(m.group(1), "%Y-%m-%d:%H:%M:%S")) for m in (start, end)]
    return stamps[1] - stamps[0]


def _doc_id(row: dict) -> int:
    return int(row["doc_id"])


# ---------------------------------------------------------------- comparing


def relative_difference(ours: float, theirs: float) -> float:
    return abs(ours - theirs) / abs(theirs) if theirs else math.inf


def compare_probe(texts: list[str], ours: dict, ours_rows: list[dict], theirs: dict, theirs_rows: list[dict]) -> dict:
    """Corpus metrics side by side, lmforge's word_perplexity derived as lm-eval does, per-document agreement."""
    if [row["chars"] for row in ours_rows] != [len(text) for text in texts]:
        raise RuntimeError("lmforge's probe samples are not the records written for lm-eval")
    ours_ll = [row["loglikelihood"] for row in ours_rows]
    theirs_ll = [_number(row["filtered_resps"]) for row in theirs_rows]
    words = sum(len(re.split(r"\s+", text)) for text in texts)  # lm-eval's word count
    ours = {**ours, "word_perplexity": math.exp(-sum(ours_ll) / words)}
    metrics = {}
    for name in ("bits_per_byte", "byte_perplexity", "word_perplexity"):
        metrics[name] = {
            "lmforge": ours[name],
            "lm-eval": theirs[name],
            "rel_diff": relative_difference(ours[name], theirs[name]),
        }
    per_doc = [relative_difference(a, b) for a, b in zip(ours_ll, theirs_ll, strict=True)]
    worst = max(range(len(per_doc)), key=per_doc.__getitem__)
    return {
        "metrics": metrics,
        "lmforge_token_perplexity": ours["perplexity"],
        "lmforge_tokens": ours["tokens"],
        "per_doc_loglikelihood_max_rel_diff": per_doc[worst],
        "per_doc_worst": {"doc": worst, "lmforge": ours_ll[worst], "lm-eval": theirs_ll[worst]},
    }


def _number(value) -> float:
    while isinstance(value, list | tuple):
        value = value[0]
    return float(value)


def compare_dates(
    records: list[dict], prompts: list[str], ours: dict, ours_rows: list[dict], theirs: dict, theirs_rows: list[dict]
) -> dict:
    """exact_match side by side (lm-eval's raw rule and lmforge's stripped rule), identical prompts and outputs."""
    if [(r["prompt"], r["target"]) for r in ours_rows] != [(r["prompt"], r["answer"]) for r in records]:
        raise RuntimeError("lmforge's dates samples are not the records written for lm-eval")
    ours_out = [row["output"] for row in ours_rows]
    theirs_out = [row["filtered_resps"][0] for row in theirs_rows]
    theirs_prompts = [row["arguments"]["gen_args_0"]["arg_0"] for row in theirs_rows]
    answers = [r["answer"] for r in records]
    stripped = statistics.fmean(o.strip() == a.strip() for o, a in zip(theirs_out, answers, strict=True))
    differing = [
        {"doc": i, "lmforge": a, "lm-eval": b}
        for i, (a, b) in enumerate(zip(ours_out, theirs_out, strict=True))
        if a != b
    ]
    return {
        "metrics": {
            "exact_match": {
                "lmforge": ours["exact_match"],
                "lm-eval": theirs["exact_match"],
                "lm-eval_stripped": stripped,
            }
        },
        "n": len(records),
        "identical_prompts": sum(a == b for a, b in zip(prompts, theirs_prompts, strict=True)),
        "identical_generations": len(records) - len(differing),
        "identical_after_strip": sum(a.strip() == b.strip() for a, b in zip(ours_out, theirs_out, strict=True)),
        "differing_generations": differing[:10],
        "sample_generations": [{"answer": a, "lmforge": o} for a, o in zip(answers[:3], ours_out[:3], strict=True)],
    }


def chat_prompts(folder: Path, records: list[dict]) -> list[str]:
    """The prompts lmforge renders for the records (to check lm-eval sends the model the same text)."""
    from transformers import AutoTokenizer

    from lmforge.data.chat import chat_prompt

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return [chat_prompt(tokenizer, record["prompt"]) for record in records]


def summarise(runs: list[RunResult], workloads: list[Workload]) -> dict:
    """Median cost per tool and workload, with ratios."""
    summary = {}
    for work in workloads:
        row: dict = {}
        for tool in ("lmforge", "lm-eval"):
            mine = [r for r in runs if r.tool == tool and r.workload == work.name]
            row[tool] = {
                key: statistics.median(getattr(r, key) for r in mine)
                for key in ("wall_s", "cpu_s", "peak_rss_mb", "scoring_s")
            }
        row["wall_ratio_lmeval_over_lmforge"] = row["lm-eval"]["wall_s"] / row["lmforge"]["wall_s"]
        row["scoring_ratio_lmeval_over_lmforge"] = row["lm-eval"]["scoring_s"] / row["lmforge"]["scoring_s"]
        row["rss_ratio_lmforge_over_lmeval"] = row["lmforge"]["peak_rss_mb"] / row["lm-eval"]["peak_rss_mb"]
        summary[work.name] = row
    return summary


def print_table(summary: dict, comparisons: dict) -> None:
    head = f"{'workload':<8} {'measure':<28} {'lmforge':>12} {'lm-eval':>12}  ratio / difference"
    print("\n" + head + "\n" + "-" * (len(head) + 12))
    for name, row in summary.items():
        for measure_name, ours, theirs, note in table_lines(row, comparisons[name]):
            print(f"{name:<8} {measure_name:<28} {_fmt(ours):>12} {_fmt(theirs):>12}  {note}")
    print()


def table_lines(row: dict, comparison: dict) -> list[tuple[str, float | None, float | None, str]]:
    """(measure, lmforge, lm-eval, note) rows for one workload: cost first, then metrics and agreement."""
    a, b = row["lmforge"], row["lm-eval"]
    slower = "x lm-eval/lmforge"
    lines = [
        ("wall s (median)", a["wall_s"], b["wall_s"], f"{row['wall_ratio_lmeval_over_lmforge']:.2f}{slower}"),
        (
            "scoring s (no start-up/load)",
            a["scoring_s"],
            b["scoring_s"],
            f"{row['scoring_ratio_lmeval_over_lmforge']:.2f}{slower}",
        ),
        ("cpu s (user+sys)", a["cpu_s"], b["cpu_s"], f"{b['cpu_s'] / a['cpu_s']:.2f}{slower}"),
        (
            "peak RSS MB",
            a["peak_rss_mb"],
            b["peak_rss_mb"],
            f"{row['rss_ratio_lmforge_over_lmeval']:.2f}x lmforge/lm-eval",
        ),
    ]
    for metric, values in comparison["metrics"].items():
        if "rel_diff" in values:
            note = f"rel diff {values['rel_diff']:.2e}"
        else:
            note = f"lm-eval after strip(): {values['lm-eval_stripped']:.4f}"
        lines.append((metric, values["lmforge"], values["lm-eval"], note))
    if "per_doc_loglikelihood_max_rel_diff" in comparison:
        lines.append(
            ("per-doc loglik max rel diff", None, None, f"{comparison['per_doc_loglikelihood_max_rel_diff']:.2e}")
        )
    else:
        n = comparison["n"]
        lines.append(("identical prompts", None, None, f"{comparison['identical_prompts']}/{n}"))
        lines.append(("identical generations", None, None, f"{comparison['identical_generations']}/{n}"))
    return lines


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=50, help="first N test records of `dates` (default 50)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per tool and workload, order alternating")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", default="default", help="lmforge model reference; both tools load its folder")
    parser.add_argument("--workloads", nargs="+", default=["probe", "dates"], choices=["probe", "dates"])
    parser.add_argument("--peer-venv", type=Path, default=ROOT / "bench" / ".venv-lmeval")
    parser.add_argument("--lmforge-python", type=Path, default=peers.main_python())
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "eval_vs_lmeval.json")
    parser.add_argument("--threads", type=int, help="OMP/MKL threads for both tools (default: their own choice)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before a child run is killed")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, outputs)")
    return parser.parse_args(argv)


def run_pair(
    work: Workload, repeat: int, args: argparse.Namespace, folder: Path, lm_eval: Path, tasks: Path, workdir: Path
) -> dict[str, tuple[RunResult, list[dict]]]:
    """Both tools on one workload, lmforge first on even repeats; returns each tool's result and samples."""
    tools = ["lmforge", "lm-eval"] if repeat % 2 == 0 else ["lm-eval", "lmforge"]
    outcome = {}
    for tool in tools:
        run_dir = workdir / f"{tool}-{work.name}-{repeat}"
        run_dir.mkdir()
        env = {**os.environ, **OFFLINE, "HF_DATASETS_CACHE": str(run_dir / "hf_datasets")}
        if args.threads:
            env |= {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        out = run_dir / "out"
        if tool == "lmforge":
            command = lmforge_command(args.lmforge_python, folder, work, out, args.batch_size)
        else:
            command = lmeval_command(lm_eval, folder, work, tasks, out, args.batch_size)
        print(f"[{repeat + 1}/{args.repeats}] {work.name:<6} {tool:<8} ...", end=" ", flush=True)
        load = os.getloadavg()[0]  # other work on a shared machine shows here
        wall, cpu, rss = peers.measure(command, env, run_dir / "log.txt", args.timeout)
        reader = read_lmforge if tool == "lmforge" else read_lmeval
        task = work.lmforge_task if tool == "lmforge" else work.lmeval_task
        metrics, rows, scoring_s = reader(out, task, run_dir / "log.txt")
        print(f"{wall:7.1f} s wall, {rss:7.0f} MB peak RSS (load before {load:.1f})", flush=True)
        outcome[tool] = (RunResult(tool, work.name, repeat, wall, cpu, rss, scoring_s, load, metrics), rows)
    return outcome


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.limit < 1 or args.repeats < 1 or args.batch_size < 1:
        raise SystemExit("--limit, --repeats and --batch-size must be >= 1")
    sys.path.insert(0, str(ROOT))
    from lmforge.models.load import resolve_model

    folder = resolve_model(args.model)  # both tools load this folder (no per-run GGUF hashing for lmforge)
    lm_eval = peers.ensure_peer_venv(args.peer_venv, PEER, "lm_eval", SHARED_PINS).parent / "lm_eval"
    workdir = Path(tempfile.mkdtemp(prefix="eval_vs_lmeval-"))
    try:
        records = write_records(workdir, args.limit)
        tasks = write_lmeval_tasks(workdir)
        all_workloads = {
            "probe": Workload("probe", "probe", "lmforge_probe", None, chat=False),
            "dates": Workload("dates", "dates", "lmforge_dates", args.limit, chat=True),
        }
        workloads = [all_workloads[name] for name in args.workloads]
        runs: list[RunResult] = []
        last: dict[str, dict] = {}
        for repeat in range(args.repeats):
            for work in workloads:
                outcome = run_pair(work, repeat, args, folder, lm_eval, tasks, workdir)
                runs += [result for result, _ in outcome.values()]
                last[work.name] = outcome
        comparisons = {}
        for work in workloads:
            (ours, ours_rows), (theirs, theirs_rows) = last[work.name]["lmforge"], last[work.name]["lm-eval"]
            if work.name == "probe":
                texts = [r["text"] for r in records["probe"]]
                comparisons["probe"] = compare_probe(texts, ours.metrics, ours_rows, theirs.metrics, theirs_rows)
            else:
                prompts = chat_prompts(folder, records["dates"])
                comparisons["dates"] = compare_dates(
                    records["dates"], prompts, ours.metrics, ours_rows, theirs.metrics, theirs_rows
                )
        summary = summarise(runs, workloads)
        print_table(summary, comparisons)
        write_report(args, folder, lm_eval, summary, comparisons, runs)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def write_report(args, folder: Path, lm_eval: Path, summary: dict, comparisons: dict, runs: list[RunResult]) -> None:
    peer_python = lm_eval.parent / "python"
    report = {
        "benchmark": "eval_vs_lmeval",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {
            "model": args.model,
            "model_folder": str(folder),
            "limit": args.limit,
            "repeats": args.repeats,
            "batch_size": args.batch_size,
            "dtype": "float32",
            "device": "cpu",
            "threads": args.threads,
        },
        "machine": peers.machine(),
        "versions": {
            "lmforge": {n: importlib.metadata.version(n) for n in ("lmforge", "torch", *SHARED_PINS)},
            "lm-eval": {
                n: peers.installed_version(peer_python, n) for n in ("lm_eval", "torch", "datasets", *SHARED_PINS)
            },
        },
        "summary": summary,
        "comparisons": comparisons,
        "runs": [asdict(run) for run in runs],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")


if __name__ == "__main__":
    sys.exit(main())
