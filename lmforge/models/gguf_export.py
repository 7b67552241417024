"""`lmforge export MODEL --gguf OUT.gguf --type f16|q8_0`: a llama model as a file llama.cpp and Ollama run.

Any reference lmforge loads (a folder, a LoRA adapter folder, which `load_model` merges into its base, a
.gguf file, a hub id, `default`) is loaded in float32 on the CPU and written as llama.cpp's
`convert_hf_to_gguf.py` writes llama: the `llama.*` hyperparameters, the byte-level BPE tokenizer with its
chat template (both from models/gguf.py) and ggml tensor names with the rotary Q/K rows permuted. As in
llama.cpp, 2-D weights become f16 or q8_0 (gguf-py's quantiser: blocks of 32 int8 with one f16 scale; a
matrix whose rows do not split into blocks stays f16) and norms stay f32. The file is written under a
hidden name beside the target and renamed into place, so an error or Ctrl-C leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import gguf

from lmforge.errors import UserError
from lmforge.models.gguf import llama_tensors, write_gguf
from lmforge.models.load import load_model

_ARCH = "llama"
# --type -> (the file type llama.cpp records, the type of each 2-D weight)
GGUF_TYPES = {
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}


def export_gguf(model: str | Path, out: str | Path, type: str = "f16", overwrite: bool = False) -> Path:
    """Write the llama model `model` as a GGUF file at `out`; returns `out`.

    Args:
        model: `default`, a model or LoRA adapter folder, a `.gguf` file or a hub id.
        out: the `.gguf` file to write; its folder must exist.
        type: `f16` (matrices as float16) or `q8_0` (matrices as 8-bit blocks, about half the size).
        overwrite: replace an existing `out`.

    Raises:
        UserError: an unknown type, a missing folder, an existing file, a model that is not llama or a
            tokenizer GGUF cannot hold; nothing is written then.
    """
    out = _checked_target(Path(out), type, overwrite)
    loaded = load_model(model, dtype="float32", device="cpu")
    config = loaded.model.config
    if config.model_type != _ARCH:
        raise UserError(
            f"cannot export {model}: it is a {config.model_type!r} model and GGUF export supports only llama "
            "(the default model's family)"
        )
    tokenizer_json = _tokenizer_json(loaded.tokenizer, model)
    file_type, matrix_type = GGUF_TYPES[type]

    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        try:
            tensors = llama_tensors(loaded.model.state_dict(), config, matrix_type)
            write_gguf(staging, out.stem, file_type, config, loaded.tokenizer, tokenizer_json, tensors)
        except ValueError as err:
            raise UserError(f"cannot export {model} to GGUF: {err}") from None
        if out.exists() and not overwrite:  # appeared while we wrote: never replace it unasked
            raise UserError(f"{out} exists: pass --overwrite or choose another file")
        os.replace(staging, out)
    finally:
        staging.unlink(missing_ok=True)
    return out


def _checked_target(out: Path, type: str, overwrite: bool) -> Path:
    """Refuse, before any model loads, a type we cannot write and a target we must not (over)write."""
    if type not in GGUF_TYPES:
        raise UserError(f"unknown GGUF type '{type}': use one of {', '.join(GGUF_TYPES)}")
    if out.suffix != ".gguf":
        raise UserError(f"GGUF output {out} must end in .gguf (lmforge and llama.cpp recognise files by it)")
    if not out.parent.is_dir():
        raise UserError(f"folder {out.parent} does not exist (for {out}): create it first or choose another path")
    if out.is_dir():
        raise UserError(f"{out} is a folder: name a .gguf file to write")
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists: pass --overwrite or choose another file")
    return out


def _tokenizer_json(tokenizer: Any, model: str | Path) -> dict:
    """The tokenizer.json spec behind a fast tokenizer (merges and pre-tokenizer live only there)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(
            f"cannot export {model}: its tokenizer ({type(tokenizer).__name__}) has no tokenizer.json; "
            "GGUF export needs a byte-level BPE fast tokenizer"
        )
    return json.loads(backend.to_str())
