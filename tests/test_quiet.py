"""A quiet terminal: lmforge's training, merging and tuning commands print no dependency warnings, no
library log lines and nothing but lmforge's own `lmforge: ...` lines on stderr, with warnings made errors.

The five commands run in one child Python process started with PYTHONWARNINGS=error (so a warning raised
anywhere, in lmforge or a library it calls, is an exception and fails its command), each through the real
entry point `lmforge.cli.main` with its own argv: one interpreter start instead of five keeps the test fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
from cli_helpers import run_cli

from lmforge.models.tiny import make_tiny_llama

RUN_EACH = """
import json, sys
from lmforge import cli
codes = []
for argv in json.loads(sys.argv[1]):
    sys.argv = ["lmforge", *argv]
    try:
        cli.main()
        codes.append(0)
    except SystemExit as exit_:
        codes.append(exit_.code or 0)
print("EXIT CODES " + json.dumps(codes))
"""

SMALL = ["eval.probe=false", "train.batch_size=4"]  # finetune scores one record; the others score no task


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("quiet")
    make_tiny_llama(root / "a", seed=0)
    make_tiny_llama(root / "b", seed=1)
    sft = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(16)]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft), encoding="utf-8")
    pairs = [{"prompt": f"Q{i}?", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(8)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    (root / "tune.yaml").write_text("trials: 2\nspace:\n  max_steps: [1, 1]\n  lora_r: [4]\n", encoding="utf-8")
    return root


def test_training_merging_and_tuning_print_only_lmforge_lines(workspace):
    commands = [
        ["finetune", "--model", "a", "--task", "dates", "--steps", "1", "--out", "ft", "data.limit=16", "eval.limit=1",
         *SMALL],
        ["dpo", "--model", "a", "--data", "pairs.jsonl", "--steps", "1", "--out", "dpo", "data.val_fraction=0.25",
         *SMALL],
        ["distill", "--teacher", "a", "--student-layers", "1", "--data", "sft.jsonl", "--steps", "1", "--out", "dist",
         *SMALL],
        ["merge", "--method", "linear", "--weight", "0.5", "a", "b", "merged"],
        ["tune", "tune.yaml", "model=a", "output=tuned", "data.path=sft.jsonl", "data.val_fraction=0.25", *SMALL],
    ]  # fmt: skip
    env = os.environ | {"PYTHONWARNINGS": "error", "LMFORGE_CACHE": str(workspace / "cache")}
    done = subprocess.run(
        [sys.executable, "-c", RUN_EACH, json.dumps(commands)],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert f"EXIT CODES {json.dumps([0] * len(commands))}" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    for folder in ("ft", "dpo", "dist", "merged", "tuned/best"):
        assert (workspace / folder / "run.json").is_file()
    lines = done.stderr.splitlines()
    assert any(line.startswith("lmforge: step 1/1") for line in lines)  # the commands did log, as lmforge
    foreign = [line for line in lines if not line.startswith("lmforge: ") or line.startswith("lmforge: error")]
    assert foreign == [], done.stderr


def test_other_libraries_info_records_are_not_printed_as_lmforge_lines():
    """Records logged at exit (as torch logs its FakeTensor cache stats) by loggers without a handler of their
    own: a library's INFO stays silent (it used to print as `lmforge: ...`), its warning carries its name."""
    script = (
        "import atexit, logging, sys\n"
        "atexit.register(logging.getLogger('alembic.runtime.migration').info, 'Context impl SQLiteImpl.')\n"
        "atexit.register(logging.getLogger('some.library').warning, 'theirs')\n"
        "atexit.register(logging.getLogger('lmforge.test').info, 'ours')\n"
        "sys.argv = ['lmforge', 'tasks']\n"
        "from lmforge import cli\n"
        "cli.main()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "arithmetic" in done.stdout, done.stderr
    assert done.stderr.splitlines() == ["lmforge: ours", "some.library: WARNING: theirs"]


def test_piped_explain_and_compare_keep_whole_names_and_count_small_models_in_k(workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    code, out, _ = run_cli(
        monkeypatch, capsys, "merge", "--method", "linear", "--weight", "0.5", "a", "b", "x", "--explain"
    )
    assert code == 0 and "…" not in out
    assert "model.layers.1.self_attn.q_proj.weight" in out and "mlp.down_proj.weight" in out

    label = "a-merge-label-longer-than-any-terminal-column-would-leave-it"
    code, _, _ = run_cli(monkeypatch, capsys, "merge", "--method", "linear", "--weight", "0.5", "a", "b", "piped")
    assert code == 0
    params = json.loads((workspace / "piped" / "run.json").read_text())["params_total"]
    assert params < 100_000  # a tiny model: its count is shown in K
    code, out, _ = run_cli(monkeypatch, capsys, "compare", f"{label}=piped", "plain=piped")
    assert code == 0 and "…" not in out
    assert label in out and f"{params / 1e3:.1f} K" in out and "0.0 M" not in out


def test_compare_names_a_folder_that_does_not_exist(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "compare", str(tmp_path / "no-such-run"))
    assert code == 2 and err.splitlines() == [
        f"lmforge: error: run folder {tmp_path / 'no-such-run'} does not exist: check the path (a typo, or a run "
        "not made yet)"
    ]


def test_piped_data_preview_marks_the_trained_text(monkeypatch, capsys, tmp_path, tiny_llama):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "What?", "completion": "That."}) + "\n", encoding="utf-8")
    code, out, _ = run_cli(monkeypatch, capsys, "data", "preview", str(path), "--model", str(tiny_llama))
    assert code == 0
    rendered = out.split("rendered (trained text between ⟦ and ⟧, the rest masked):\n", 1)[1]
    # the completion and its stop token are trained; the prompt and the template's newline after EOS are not
    assert rendered == "<|im_start|>user\nWhat?<|im_end|>\n<|im_start|>assistant\n⟦That.<|im_end|>⟧\n\n"


def test_a_merge_missing_a_parameter_stops_before_merging_an_adapter(monkeypatch, capsys, tmp_path, tiny_llama):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():  # PEFT reads transformers' deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_llama), LoraConfig(r=2, target_modules=["q_proj"])
        )
    model.save_pretrained(tmp_path / "adapter")
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    ref = f"{tiny_llama}+{tmp_path / 'adapter'}"
    code, out, err = run_cli(
        monkeypatch, capsys, "merge", "--method", "linear", ref, str(tiny_llama), str(tmp_path / "o")
    )
    assert code == 2 and err.splitlines() == [
        f"lmforge: error: config: missing parameter 'weight' for {ref}: set it in that model's parameters or in "
        "the top-level parameters"
    ]
    assert out == "" and not (tmp_path / "cache" / "merged_adapters").exists() and not (tmp_path / "o").exists()
