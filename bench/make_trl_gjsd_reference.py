"""Write tests/data/trl_gjsd_reference.json: TRL's generalized JSD on small fixed logits, as a test oracle.

lmforge's distillation objectives are checked against the loss TRL publishes
(`trl.experimental.gkd.GKDTrainer.generalized_jsd_loss`, trl 1.16.0, Agarwal et al. 2024, Eq. 1,
https://huggingface.co/papers/2306.13649) without TRL in lmforge's environment: this script runs TRL once in its
own virtualenv (bench/.venv-trl, created by bench/peers.ensure_peer_venv if missing) and stores its values.
All arithmetic is float64, on logits rounded to 4 decimals so the JSON holds them exactly as they were used.

Run from the repository root:  .venv/bin/python bench/make_trl_gjsd_reference.py [--peer-venv DIR]

JSON schema (all tensors are nested lists, row-major):
{
  "source":   "trl.experimental.gkd.GKDTrainer.generalized_jsd_loss",
  "versions": {"trl": str, "torch": str},
  "dtype":    "float64",
  "seed":     int,                         # torch.Generator seed that drew the logits
  "shape":    [B, T, V],                   # [2, 5, 11]
  "student_logits": float[B][T][V],        # already shifted: position t predicts label t
  "teacher_logits": float[B][T][V],
  "labels":   int[B][T],                   # -100 where no loss is taken (prompt / padding)
  "conventions": {str: str},               # the definitions below, in words
  "cases": [                               # 5 betas x 2 temperatures x 2 masks x 3 reductions = 60
    {
      "beta": float,                       # 0, 0.1, 0.5, 0.9, 1
      "temperature": float,                # 1, 2
      "masked": bool,                      # true: labels passed (mask = labels != -100); false: labels=None
      "reduction": "batchmean" | "sum" | "mean",
      "loss": float,                       # TRL's returned scalar
      "per_token": float[B][T],            # sum over V of TRL's reduction="none" output, every position
                                           # (masked positions included; the mask only selects, it does not scale)
      "grad_student_logits": float[B][T][V]  # d loss / d student_logits; only in reduction "sum" cases
    }
  ]
}

TRL's definitions, as read from its source (what a comparison must reproduce):
- log-probs are log_softmax(logits / temperature) for both models; no T^2 factor is applied.
- beta == 0: KL(teacher || student) (forward KL); beta == 1: KL(student || teacher) (reverse KL);
  otherwise, with m = beta * p_teacher + (1 - beta) * p_student:
  beta * KL(teacher || m) + (1 - beta) * KL(student || m)   (beta = 0.5 is the ordinary JSD, <= ln 2).
- per position, the divergence is the sum over the vocabulary of the elementwise terms.
- "sum": sum over the kept positions (all positions without a mask).
- "batchmean": with a mask, sum / number of kept positions (a per-token mean); WITHOUT a mask,
  sum / B (a per-sequence sum, not a per-token mean).
- "mean": sum / (kept positions x V): torch's elementwise mean, so it also divides by the vocabulary size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "tests" / "data" / "trl_gjsd_reference.json"
SEED, SHAPE = 0, (2, 5, 11)
BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)
TEMPERATURES = (1.0, 2.0)
REDUCTIONS = ("batchmean", "sum", "mean")
CONVENTIONS = {
    "log_probs": "log_softmax(logits / temperature); no T^2 factor",
    "beta_0": "KL(teacher || student), forward KL",
    "beta_1": "KL(student || teacher), reverse KL",
    "beta_between": "beta*KL(teacher||m) + (1-beta)*KL(student||m), m = beta*p_teacher + (1-beta)*p_student",
    "sum": "sum over kept positions of the per-position divergence",
    "batchmean": "masked: sum / kept positions; unmasked: sum / B",
    "mean": "sum / (kept positions * V)",
}


def reference() -> dict:
    """Every case, computed with TRL's own function (this runs inside the TRL virtualenv)."""
    import torch
    import trl
    from trl.experimental.gkd import GKDTrainer

    generator = torch.Generator().manual_seed(SEED)
    student = (torch.randn(SHAPE, generator=generator, dtype=torch.float64) * 2).round(decimals=4)
    teacher = (torch.randn(SHAPE, generator=generator, dtype=torch.float64) * 2).round(decimals=4)
    labels = torch.randint(0, SHAPE[2], SHAPE[:2], generator=generator)
    labels[0, :2] = -100  # a prompt
    labels[1, 0] = -100  # a shorter prompt ...
    labels[1, -1] = -100  # ... and a padded position
    cases = []
    for beta in BETAS:
        for temperature in TEMPERATURES:
            per_token = GKDTrainer.generalized_jsd_loss(
                student, teacher, None, beta=beta, temperature=temperature, reduction="none"
            ).sum(-1)
            for masked in (True, False):
                for reduction in REDUCTIONS:
                    logits = student.clone().requires_grad_(True)
                    loss = GKDTrainer.generalized_jsd_loss(
                        logits,
                        teacher,
                        labels if masked else None,
                        beta=beta,
                        temperature=temperature,
                        reduction=reduction,
                    )
                    case = {
                        "beta": beta,
                        "temperature": temperature,
                        "masked": masked,
                        "reduction": reduction,
                        "loss": loss.item(),
                        "per_token": per_token.tolist(),
                    }
                    if reduction == "sum":
                        loss.backward()
                        case["grad_student_logits"] = logits.grad.tolist()
                    cases.append(case)
    return {
        "source": "trl.experimental.gkd.GKDTrainer.generalized_jsd_loss",
        "versions": {"trl": trl.__version__, "torch": torch.__version__},
        "dtype": "float64",
        "seed": SEED,
        "shape": list(SHAPE),
        "student_logits": student.tolist(),
        "teacher_logits": teacher.tolist(),
        "labels": labels.tolist(),
        "conventions": CONVENTIONS,
        "cases": cases,
    }


def to_json(data: dict) -> str:
    """One line per top-level key and per case, so a diff of the file shows which values moved."""
    lines = [f"  {json.dumps(key)}: {json.dumps(value)}," for key, value in data.items() if key != "cases"]
    cases = ",\n".join(f"    {json.dumps(case)}" for case in data["cases"])
    return "{\n" + "\n".join(lines) + '\n  "cases": [\n' + cases + "\n  ]\n}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-venv", type=Path, default=ROOT / "bench" / ".venv-trl")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)  # set when run in the TRL venv
    args = parser.parse_args(argv)
    if args.inside:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(to_json(reference()))
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import peers
    from distill_vs_trl import PEER, SHARED_PINS

    python = peers.ensure_peer_venv(args.peer_venv, PEER, "trl", SHARED_PINS)
    command = [str(python), str(Path(__file__).resolve()), "--inside", "--output", str(args.output)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    subprocess.run(command, check=True, env=env)
    cases = json.loads(args.output.read_text())["cases"]
    print(f"wrote {len(cases)} cases to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
