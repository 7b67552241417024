"""Data files in, normalised records out.

Reads jsonl / json / csv / parquet files and local `datasets` folders (arrow files written by
`save_to_disk`, read with pyarrow so `datasets` is not a dependency). The format is detected from the
keys of the first record, or forced with `fmt`; `columns` maps the user's keys onto the canonical ones.
Every record is checked, and a bad one is named by file, line and key. Records come out as:
text {text} | prompt_completion {prompt, completion} | messages {messages} |
preference {prompt, chosen, rejected}; alpaca {instruction, input, output} and prompt_answer {prompt, answer}
(the eval task shape) become prompt_completion.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterator
from pathlib import Path

from lmforge.errors import UserError

# Format name -> keys it requires, in detection order (the first format whose keys are all present wins).
FORMATS: dict[str, tuple[str, ...]] = {
    "preference": ("prompt", "chosen", "rejected"),
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "prompt_answer": ("prompt", "answer"),  # what `lmforge data export` writes and eval reads: trained as a completion
    "text": ("text",),
}
_FILE_KINDS = (".jsonl", ".json", ".csv", ".parquet", ".arrow")


def load_records(path: str | Path, fmt: str | None = None, columns: dict[str, str] | None = None) -> list[dict]:
    """Load a data file or folder into normalised records.

    Args:
        path: a .jsonl/.json/.csv/.parquet file, or a folder (a `datasets` save_to_disk folder, or one
            holding such files).
        fmt: force a format (one of FORMATS); detected from the first record when None.
        columns: canonical key -> the user's key, e.g. {"prompt": "question", "completion": "answer"}.
    Returns:
        A list of dicts in the canonical shape of the format (see module docstring), each with the
        detected format under "format".
    """
    path = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise UserError(f"unknown data format '{fmt}': use one of {', '.join(FORMATS)}")
    if not path.exists():
        raise UserError(f"data file not found: {path}: check the path")
    rows = list(_read_rows(path))
    if not rows:
        raise UserError(f"{path} is empty: it holds no records")
    renamed = [(where, _rename(row, columns or {})) for where, row in rows]
    fmt = fmt or detect_format(renamed[0][1], f"{renamed[0][0]}")
    return [_normalise(row, fmt, where) | {"format": fmt} for where, row in renamed]


def detect_format(row: dict, where: str) -> str:
    """Name the format whose required keys the row has; fail naming the keys seen and the fix."""
    for fmt, keys in FORMATS.items():
        if all(key in row for key in keys):
            return fmt
    raise UserError(
        f"{where}: cannot tell the data format from keys {sorted(row)}: expected one of "
        + "; ".join(f"{fmt} ({', '.join(keys)})" for fmt, keys in FORMATS.items())
        + "; or map your keys with --columns prompt=YOURKEY,completion=YOURKEY"
    )


def split_records(records: list, val_fraction: float = 0.1, seed: int = 0) -> tuple[list, list]:
    """Seeded train/validation split: the same records and seed always give the same split."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"validation fraction must be in [0, 1), got {val_fraction}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = round(len(records) * val_fraction)
    if val_fraction > 0 and n_val == 0 and len(records) > 1:
        n_val = 1
    n_val = min(n_val, max(len(records) - 1, 0))  # rounding up must never leave training empty
    val_idx = set(order[:n_val])
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    return train, val


def _rename(row: dict, columns: dict[str, str]) -> dict:
    if not columns:
        return row
    out = {k: v for k, v in row.items() if k not in columns.values()}
    for canonical, theirs in columns.items():
        if theirs in row:
            out[canonical] = row[theirs]
    return out


def _normalise(row: dict, fmt: str, where: str) -> dict:
    for key in FORMATS[fmt]:
        if key not in row:
            raise UserError(
                f"{where}: missing key '{key}' (format {fmt} needs {', '.join(FORMATS[fmt])}): fix the "
                f"record or map a column with --columns {key}=YOURKEY"
            )
    if fmt == "messages":
        return {"messages": _check_messages(row["messages"], where)}
    if fmt == "alpaca":
        prompt = _text(row, "instruction", where)
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise UserError(f"{where}: key 'input' must be a string, got {type(extra).__name__}")
        return {"prompt": f"{prompt}\n\n{extra}" if extra else prompt, "completion": _text(row, "output", where)}
    if fmt == "prompt_answer":
        return {"prompt": _text(row, "prompt", where), "completion": _text(row, "answer", where)}
    return {key: _text(row, key, where) for key in FORMATS[fmt]}


def _text(row: dict, key: str, where: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise UserError(f"{where}: key '{key}' must be a string, got {type(value).__name__}")
    return value


def _check_messages(messages: object, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: key 'messages' must be a non-empty list of {{role, content}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise UserError(f"{where}: messages[{i}] needs keys 'role' and 'content'")
        if message["role"] not in ("system", "user", "assistant"):
            raise UserError(f"{where}: messages[{i}] has role {message['role']!r}: use system, user or assistant")
        if not isinstance(message["content"], str):  # str() would train on the text 'None' or a list's repr
            raise UserError(
                f"{where}: messages[{i}] key 'content' must be a string, got {type(message['content']).__name__}"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: key 'messages' has no assistant turn, so there is nothing to learn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _read_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """Yield (location, row) pairs; the location names file and line (or row) for error messages."""
    if path.is_dir():
        yield from _read_folder(path)
        return
    suffix = path.suffix.lower()
    try:
        yield from _read_text_rows(path, suffix)
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}): re-save the file as UTF-8") from None


def _read_text_rows(path: Path, suffix: str) -> Iterator[tuple[str, dict]]:
    # utf-8-sig: files saved by Excel/Notepad start with a BOM, which would otherwise prefix the first key.
    if suffix == ".jsonl":
        with open(path, encoding="utf-8-sig") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    yield f"{path}:{number}", _json_object(line, f"{path}:{number}")
    elif suffix == ".json":
        data = _json_object(path.read_text(encoding="utf-8-sig").strip() or "[]", str(path), allow_list=True)
        if isinstance(data, dict):
            data = data.get("data", [data])
        if not isinstance(data, list):
            raise UserError(f"{path}: key 'data' must be a list of records, got {type(data).__name__}")
        for number, row in enumerate(data, 1):
            if not isinstance(row, dict):
                raise UserError(f"{path}: record {number} is not a JSON object")
            yield f"{path}: record {number}", row
    elif suffix == ".csv":
        yield from _read_csv(path)
    elif suffix in (".parquet", ".arrow"):
        for number, row in enumerate(_read_arrow(path), 1):
            yield f"{path}: row {number}", row
    else:
        raise UserError(f"unsupported data file {path}: use {', '.join(_FILE_KINDS)} or a datasets folder")


def _read_csv(path: Path) -> Iterator[tuple[str, dict]]:
    """CSV rows, named by line; a row whose field count differs from the header's is refused, not cut."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            for row in reader:
                where = f"{path}:{reader.line_num}"  # line_num: a quoted field may span several lines
                if None in row or None in row.values():
                    fields = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or [])
                    raise UserError(
                        f"{where}: {fields} fields but the header has {len(reader.fieldnames)}: quote fields "
                        "that contain commas"
                    )
                yield where, row
        except csv.Error as err:
            # DictReader.line_num lags on a failed row; its inner reader has counted the bad line.
            where = f"{path}:{reader.reader.line_num}"
            if "field limit" in str(err):  # csv's 128 KiB cap: mostly a quote left open, which runs to the end
                raise UserError(
                    f"{where}: malformed CSV (a field runs past {csv.field_size_limit()} characters): close the quote "
                    "left open above, or keep documents this long in .jsonl"
                ) from None
            raise UserError(f"{where}: malformed CSV ({err}): fix the quoting") from None


def _json_object(text: str, where: str, allow_list: bool = False) -> dict | list:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        at = f"line {err.lineno} column {err.colno}" if allow_list else f"column {err.colno}"  # a whole .json file
        raise UserError(f"{where}: invalid JSON ({err.msg} at {at})") from None
    if not isinstance(value, dict) and not (allow_list and isinstance(value, list)):
        raise UserError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def _read_arrow(path: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() == ".parquet":
            table = pq.read_table(path)
        else:  # datasets writes arrow stream files
            with pa.memory_map(str(path)) as source:
                table = pa.ipc.open_stream(source).read_all()
    except (pa.ArrowInvalid, OSError) as err:
        raise UserError(f"cannot read {path} ({err}): is it a complete parquet/arrow file?") from None
    return table.to_pylist()


# JSON files that describe a folder rather than hold records.
_FOLDER_METADATA = {"state.json", "dataset_info.json", "dataset_dict.json", "config.json"}


def _read_folder(folder: Path) -> Iterator[tuple[str, dict]]:
    if (folder / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk: one folder per split
        splits = sorted(p.name for p in folder.iterdir() if p.is_dir())
        raise UserError(
            f"{folder} holds several splits ({', '.join(splits)}): pass one split folder, e.g. {folder}/"
            f"{splits[0] if splits else 'train'}"
        )
    state = folder / "state.json"
    if state.is_file():  # datasets.save_to_disk layout
        try:
            files = [folder / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(
                f"{state} is not a datasets state file (no _data_files list): re-save the dataset"
            ) from None
    else:
        files = sorted(
            p for p in folder.rglob("*") if p.suffix.lower() in _FILE_KINDS and p.name not in _FOLDER_METADATA
        )
    if not files:
        raise UserError(f"{folder} holds no data files ({', '.join(_FILE_KINDS)}) and no datasets state.json")
    for file in files:
        yield from _read_rows(file)
