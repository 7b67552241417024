"""Tiny model families for the merge tests: a base and fine-tune-like variants (the base plus seeded noise)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmforge.models.tiny import make_tiny_llama


def perturbed(base: Path, out: Path, seed: int, scale: float = 0.05, **tiny) -> Path:
    """A copy of the tiny llama `base` (built with `tiny` arguments) with N(0, scale^2) added to every weight."""
    make_tiny_llama(out, **tiny)
    weights = load_file(base / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    noisy = {k: v + scale * torch.randn(v.shape, generator=generator) for k, v in weights.items()}
    save_file(noisy, out / "model.safetensors", metadata={"format": "pt"})
    return out


def family(root: Path, count: int = 3, **tiny) -> list[Path]:
    """[base, variant 1, ..., variant count-1] as model folders under root."""
    base = make_tiny_llama(root / "base", **tiny)
    return [base] + [perturbed(base, root / f"ft{i}", seed=i, **tiny) for i in range(1, count)]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder (one file or shards)."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(file))
    return out


def edit_weights(folder: Path, change) -> None:
    """Rewrite a folder's model.safetensors through `change(dict) -> dict`."""
    file = folder / "model.safetensors"
    save_file(change(load_file(file)), file, metadata={"format": "pt"})


def edit_config(folder: Path, **values) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(values)
    (folder / "config.json").write_text(json.dumps(config))


def leftovers(parent: Path) -> list[str]:
    """Staging folders a failed merge must not leave behind."""
    return sorted(p.name for p in Path(parent).glob(".*partial*"))
