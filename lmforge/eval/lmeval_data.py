"""The local data of an lm-eval task YAML: `dataset_path` json/csv/parquet or a folder, and its splits.

Read as the `datasets` library reads them for lm-eval, without it: `dataset_kwargs.data_files` as one file, a
list (the train split) or a {split: file(s)} mapping; a folder without data_files gives its files to splits
by name (train/dev/test in the file name, else train). Relative paths are tried from the working folder (as
lm-eval) and then from the YAML's folder. A record missing a column that other records have is refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lmforge.errors import UserError

READERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SPLIT_NAMES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
               "val": "validation", "dev": "validation", "test": "test", "testing": "test"}  # fmt: skip


def _resolve(name: str, yaml_path: Path, base: Path | None = None) -> Path:
    """A data path as lm-eval reads it (relative to the working folder), else relative to the YAML's folder."""
    candidates = [base / name] if base else [Path(name), yaml_path.parent / name]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise UserError(f"{yaml_path}: data file {name} not found (looked in {', '.join(map(str, candidates))})")


def read_splits(path: Path, config: dict) -> dict[str, tuple[str, list[dict]]]:
    """{split: (file names, records)} from dataset_path and dataset_kwargs.data_files."""
    dataset_path = config.get("dataset_path")
    kwargs = config.get("dataset_kwargs") or {}
    if not isinstance(kwargs, dict) or set(kwargs) - {"data_files"}:
        extra = sorted(set(kwargs) - {"data_files"}) if isinstance(kwargs, dict) else ["(not a mapping)"]
        raise UserError(f"{path}: dataset_kwargs.{extra[0]} is not supported: only data_files is read")
    data_files = kwargs.get("data_files")
    folder: Path | None = None
    if dataset_path in ("json", "csv", "parquet"):
        if data_files is None:
            raise UserError(f"{path}: dataset_path '{dataset_path}' needs dataset_kwargs.data_files")
    elif isinstance(dataset_path, str) and _is_dir(dataset_path, path):
        folder = _resolve(dataset_path, path)
    else:
        raise UserError(
            f"{path}: dataset_path '{dataset_path}' is not json, csv, parquet or a local folder: lmforge reads "
            "local data only (download the dataset and point data_files at it)"
        )
    if data_files is None:
        files = _split_files(folder, path)
    elif isinstance(data_files, (str, list)):
        files = {"train": [data_files] if isinstance(data_files, str) else data_files}
    elif isinstance(data_files, dict):
        files = {s: [f] if isinstance(f, str) else f for s, f in data_files.items()}
    else:
        raise UserError(f"{path}: dataset_kwargs.data_files must be a file, a list or a {{split: file}} mapping")
    splits = {}
    for split, names in files.items():
        rows: list[dict] = []
        resolved = [_resolve(str(n), path, folder) for n in names]
        for file in resolved:
            rows += _read_file(file, dataset_path if dataset_path in READERS.values() else None, path)
        _check_columns(rows, ", ".join(map(str, resolved)))
        splits[str(split)] = (", ".join(map(str, resolved)), rows)
    return splits


def _is_dir(name: str, yaml_path: Path) -> bool:
    return Path(name).is_dir() or (yaml_path.parent / name).is_dir()


def _split_files(folder: Path, yaml_path: Path) -> dict[str, list[str]]:
    """A folder's data files by split, named as the datasets library infers them (train/dev/test in the name)."""
    files: dict[str, list[str]] = {}
    for file in sorted(folder.iterdir()):
        if file.suffix not in READERS:
            continue
        words = re.split(r"[-_.\s]", file.stem.lower())
        split = next((SPLIT_NAMES[w] for w in words if w in SPLIT_NAMES), "train")
        files.setdefault(split, []).append(file.name)
    if not files:
        raise UserError(f"{yaml_path}: folder {folder} holds no .jsonl, .json, .csv or .parquet files")
    return files


def _read_file(file: Path, reader: str | None, yaml_path: Path) -> list[dict]:
    reader = reader or READERS.get(file.suffix)
    try:
        if reader == "json":
            text = file.read_text(encoding="utf-8")
            if text.lstrip().startswith("["):
                rows = json.loads(text)
            else:
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        elif reader == "csv":
            import pyarrow.csv

            rows = pyarrow.csv.read_csv(file).to_pylist()
        elif reader == "parquet":
            import pyarrow.parquet

            rows = pyarrow.parquet.read_table(file).to_pylist()
        else:
            raise UserError(f"{yaml_path}: cannot tell how to read {file}: use .jsonl, .json, .csv or .parquet")
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise UserError(f"{yaml_path}: data file {file} could not be read ({str(err).splitlines()[0]})") from None
    except Exception as err:  # pyarrow's parse errors have no common public base class
        if type(err).__module__.startswith("pyarrow"):
            raise UserError(f"{yaml_path}: data file {file} could not be read ({str(err).splitlines()[0]})") from None
        raise
    if not all(isinstance(row, dict) for row in rows):
        raise UserError(f"{yaml_path}: data file {file} must hold one JSON object per record")
    return rows


def _check_columns(rows: list[dict], where: str) -> None:
    """Every record has every column some record has: a record missing one is a data mistake, named here."""
    columns = {key for row in rows for key in row}
    for number, row in enumerate(rows, 1):
        missing = sorted(columns - set(row))
        if missing:
            raise UserError(f"{where}: record {number} is missing column '{missing[0]}' that other records have")
