"""Write a Hugging Face llama folder as an F32 GGUF file, and read a GGUF's metadata back.

Tests and examples need a GGUF checkpoint to load (`from_pretrained(..., gguf_file=...)`) without
downloading one from a hub, so this converts a local llama folder (safetensors + byte-level BPE
`tokenizer.json`, e.g. from `make_tiny_llama`) the way llama.cpp's `convert_hf_to_gguf.py` does for
llama: ggml tensor names, the rotary Q/K row permutation, the `llama.*` hyperparameters and the
`gpt2`-model tokenizer metadata. Tensors stay F32 so a round trip is exact.
`lmforge export` (gguf_export.py) writes f16/q8_0 files through the same `llama_tensors` and `write_gguf`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

_ARCH = "llama"

# llama.cpp's name for the split regex a byte-level BPE vocabulary was trained with (`tokenizer.ggml.pre`).
# Only the layouts found in tokenizer.json files are recognised; anything else raises rather than
# writing a file that would silently tokenize differently.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_NAMES = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


def write_llama_gguf(model_dir: str | Path, out_path: str | Path) -> Path:
    """Convert the llama model in `model_dir` to an F32 GGUF at `out_path`; returns `out_path`.

    Lets tests and examples exercise GGUF loading on a locally built model. Raises `ValueError` for a
    folder this writer cannot represent faithfully (not llama, rope scaling, a non byte-level tokenizer).
    """
    model_dir, out_path = Path(model_dir), Path(out_path)
    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type != _ARCH:
        raise ValueError(f"{model_dir} holds a {config.model_type!r} model; only llama converts.")
    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    state: dict = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(shard))
    if not state:
        raise ValueError(f"no *.safetensors files in {model_dir}.")
    if not config.tie_word_embeddings and "lm_head.weight" not in state:
        raise ValueError(f"{model_dir} has untied embeddings but no lm_head.weight.")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = llama_tensors(state, config, gguf.GGMLQuantizationType.F32)
    write_gguf(out_path, model_dir.name, gguf.LlamaFileType.ALL_F32, config, tokenizer, tokenizer_json, tensors)
    return out_path


def write_gguf(
    path: Path,
    name: str,
    file_type: gguf.LlamaFileType,
    config: Any,
    tokenizer: Any,
    tokenizer_json: dict,
    tensors: list[tuple[str, np.ndarray, gguf.GGMLQuantizationType]],
) -> None:
    """One llama GGUF file: header, hyperparameters, tokenizer, then `tensors` from `llama_tensors`."""
    writer = gguf.GGUFWriter(path, _ARCH)
    writer.add_name(name)
    writer.add_file_type(file_type)
    if file_type != gguf.LlamaFileType.ALL_F32:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hyperparameters(writer, config)
    add_tokenizer(writer, tokenizer, tokenizer_json, config)
    for tensor_name, data, tensor_type in tensors:
        writer.add_tensor(tensor_name, data, raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The scalar and string metadata of a GGUF file (arrays such as the vocabulary are left out).

    Enough to name a file's architecture and shape in an error message or to pick a model class,
    without reading any tensor data.
    """
    reader = gguf.GGUFReader(path)
    metadata = {}
    for name, field in reader.fields.items():
        if not field.types or field.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        value = field.contents()
        metadata[name] = value.item() if isinstance(value, np.generic) else value
    return metadata


def add_hyperparameters(writer: gguf.GGUFWriter, config: Any) -> None:
    """The `llama.*` keys transformers' GGUF loader turns back into a `LlamaConfig`."""
    # transformers 5 keeps theta and scaling together in `rope_parameters`; older configs split them.
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope type {rope_type!r} is not supported: it would load back unscaled.")
    rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads

    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads or heads)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, tokenizer_json: dict, config: Any) -> None:
    """The `gpt2` (byte-level BPE) tokenizer keys, as llama.cpp's `get_vocab_base` writes them."""
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(tokenizer_json.get("pre_tokenizer")):
        raise ValueError("only byte-level BPE tokenizers (a ByteLevel pre-tokenizer) convert.")

    vocab = tokenizer.get_vocab()
    if len(vocab) > config.vocab_size:
        raise ValueError(f"tokenizer has {len(vocab)} tokens, the model {config.vocab_size} embeddings.")
    by_id = {index: token for token, index in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(config.vocab_size):
        if index not in by_id:  # embedding rows past the tokenizer: llama.cpp names them [PADn]
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.USER_DEFINED)
        elif index in added:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)

    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tokenizer_json.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)

    special_ids = {
        "bos": (tokenizer.bos_token_id, config.bos_token_id),
        "eos": (tokenizer.eos_token_id, config.eos_token_id),
        "pad": (tokenizer.pad_token_id, getattr(config, "pad_token_id", None)),
        "unk": (tokenizer.unk_token_id, None),
    }
    for kind, (from_tokenizer, from_config) in special_ids.items():
        token_id = from_tokenizer if from_tokenizer is not None else from_config
        if isinstance(token_id, list):  # a config may list several eos ids; the GGUF key holds one
            token_id = token_id[0] if token_id else None
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)

    # Whether encoding adds bos/eos, read off the tokenizer itself rather than guessed from config files.
    with_specials = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    added_count = len(with_specials) - len(plain)
    writer.add_add_bos_token(added_count > 0 and with_specials[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(added_count > 0 and with_specials[-1] == tokenizer.eos_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _pre_tokenizer_name(pre_tokenizer: dict | None) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for this tokenizer.json pre-tokenizer, or `ValueError`."""
    pre_tokenizer = pre_tokenizer or {}
    is_sequence = pre_tokenizer.get("type") == "Sequence"
    steps = pre_tokenizer.get("pretokenizers", []) if is_sequence else [pre_tokenizer]
    kinds = [step.get("type") for step in steps]
    byte_level_regex = kinds[-1:] == ["ByteLevel"] and steps[-1].get("use_regex", True)
    if kinds == ["ByteLevel"] and byte_level_regex:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level_regex:
        return "smollm"  # SmolLM's: digits one by one, then GPT-2's split
    if kinds == ["Split", "ByteLevel"] and not byte_level_regex:
        name = _SPLIT_NAMES.get(steps[0].get("pattern", {}).get("Regex"))
        if name is not None:
            return name
    raise ValueError(f"unrecognised byte-level pre-tokenizer {json.dumps(pre_tokenizer)}; no GGUF name for it.")


def llama_tensors(
    state: dict[str, Any], config: Any, matrix_type: gguf.GGMLQuantizationType
) -> list[tuple[str, np.ndarray, gguf.GGMLQuantizationType]]:
    """`(gguf name, data, ggml type)` per weight, as llama.cpp's `convert_hf_to_gguf.py` writes llama.

    Q/K rows are permuted for ggml's rotary layout; matrices become `matrix_type` (f32, f16 or q8_0),
    vectors stay f32. A tied `lm_head` is left out (readers tie it back to `token_embd`). `ValueError`
    names a tensor llama's GGUF layout has no name for.
    """
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads or heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    q8_block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    tensors = []
    for hf_name, tensor in state.items():
        if hf_name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and hf_name == "lm_head.weight"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"tensor {hf_name!r} has no name in llama's GGUF layout")
        array = tensor.detach().float().cpu().numpy()
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            array = permute_rotary(array, heads)
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            array = permute_rotary(array, kv_heads)
        tensor_type = matrix_type if array.ndim == 2 else gguf.GGMLQuantizationType.F32
        if tensor_type == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % q8_block:
            tensor_type = gguf.GGMLQuantizationType.F16  # rows that do not split into blocks: llama.cpp's fallback
        tensors.append((name, gguf.quants.quantize(np.ascontiguousarray(array), tensor_type), tensor_type))
    return tensors


def permute_rotary(weights: np.ndarray, heads: int) -> np.ndarray:
    """Interleave each head's rotary halves: HF rotates (x[:d/2], x[d/2:]), ggml adjacent pairs.

    transformers' GGUF loader applies the inverse when it reads `attn_q`/`attn_k` back.
    """
    head_shape = (heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
    return weights.reshape(head_shape).swapaxes(1, 2).reshape(weights.shape)
