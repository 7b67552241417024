"""The CLI: help on every verb, and each bad input is one line on stderr with exit status 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from cli_helpers import run_cli


@pytest.mark.parametrize(
    "verb",
    [[], ["eval"], ["tasks"], ["data"], ["data", "export"], ["data", "preview"], ["finetune"], ["dpo"], ["tune"]],
)
def test_help_on_every_verb(monkeypatch, capsys, verb):
    code, out, _ = run_cli(monkeypatch, capsys, *verb, "--help")
    assert code == 0 and "Usage" in out


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lmforge: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


def test_missing_model_folder(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "eval", str(tmp_path / "nope"), "--task", "dates")
    assert_one_line_error(code, err, "nope", "not found")


def test_corrupt_safetensors(monkeypatch, capsys, tiny_llama, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    code, _, err = run_cli(monkeypatch, capsys, "eval", str(broken), "--task", "dates", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "model.safetensors")
    assert not (tmp_path / "o").exists()


def test_unknown_task(monkeypatch, capsys, tiny_llama, tmp_path):
    code, _, err = run_cli(
        monkeypatch, capsys, "eval", str(tiny_llama), "--task", "datez", "--out", str(tmp_path / "o")
    )
    assert_one_line_error(code, err, "unknown task 'datez'", "dates")
    assert not (tmp_path / "o").exists()


def test_data_missing_key(monkeypatch, capsys, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps({"prompt": "c"}) + "\n")
    code, _, err = run_cli(monkeypatch, capsys, "data", "preview", str(path))
    assert_one_line_error(code, err, f"{path}:2", "'completion'")


def test_empty_data_file(monkeypatch, capsys, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    code, _, err = run_cli(monkeypatch, capsys, "data", "preview", str(path))
    assert_one_line_error(code, err, "empty")


def test_wrong_format_flag(monkeypatch, capsys, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    code, _, err = run_cli(monkeypatch, capsys, "data", "preview", str(path), "--format", "chatml")
    assert_one_line_error(code, err, "unknown data format 'chatml'", "prompt_completion")
    code, _, err = run_cli(monkeypatch, capsys, "data", "preview", str(path), "--format", "preference")
    assert_one_line_error(code, err, "missing key 'chosen'")


def test_bad_columns_flag(monkeypatch, capsys, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"q": "a", "a": "b"}) + "\n")
    code, _, err = run_cli(monkeypatch, capsys, "data", "preview", str(path), "--columns", "prompt")
    assert_one_line_error(code, err, "--columns")


def test_data_preview_with_columns_and_mask(monkeypatch, capsys, tmp_path, tiny_llama):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"q": "What?", "a": "That."}) + "\n")
    code, out, _ = run_cli(
        monkeypatch,
        capsys,
        "data",
        "preview",
        str(path),
        "--columns",
        "prompt=q,completion=a",
        "--model",
        str(tiny_llama),
    )
    assert code == 0
    assert "format prompt_completion" in out and "That." in out


def test_data_export_writes_jsonl(monkeypatch, capsys, tmp_path):
    path = tmp_path / "dates.jsonl"
    code, out, _ = run_cli(monkeypatch, capsys, "data", "export", "dates", "--split", "test", "--out", str(path))
    assert code == 0 and "200 records" in out
    first = json.loads(path.read_text().splitlines()[0])
    assert set(first) == {"prompt", "answer"}


def test_eval_prints_the_table(monkeypatch, capsys, tiny_llama, tmp_path):
    code, out, _ = run_cli(
        monkeypatch,
        capsys,
        "eval",
        str(tiny_llama),
        "--task",
        "dates",
        "--task",
        "probe",
        "--limit",
        "2",
        "--out",
        str(tmp_path / "ev"),
        "--no-footprint",
    )
    assert code == 0
    assert "exact_match" in out and "perplexity" in out
    assert (tmp_path / "ev" / "run.json").is_file()


def test_installed_entry_point_reports_errors_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lmforge.cli", "eval", str(tmp_path / "x"), "--task", "dates"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_line_error(result.returncode, result.stderr, "not found")


def test_finetune_flags_and_overrides(monkeypatch, capsys, tiny_llama, tmp_path):
    out = tmp_path / "ft"
    code, stdout, err = run_cli(
        monkeypatch,
        capsys,
        "finetune",
        f"model={tiny_llama}",
        "data.limit=24",
        "eval.limit=2",
        "eval.probe=false",
        "--task",
        "dates",
        "--out",
        str(out),
        "--steps",
        "2",
        "--lr",
        "1e-3",
    )
    assert code == 0, err
    assert (out / "adapter_model.safetensors").is_file() and "fine-tuned model in" in stdout


def test_finetune_unknown_key_is_one_line(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(
        monkeypatch, capsys, "finetune", "train.lrate=1e-3", "--task", "dates", "--out", str(tmp_path / "ft")
    )
    assert_one_line_error(code, err, "unknown key 'train.lrate'", "did you mean 'train.lr'")
