"""Read documents (strings) from jsonl, parquet, plain-text files and Hugging Face datasets saved to disk.

Paths are expanded (directories recursively, globs) and sorted, so every rank reads the same documents in the same
order. Any file that cannot be read raises DataError naming the file.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from pathlib import Path

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst"}
SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", **{s: "text" for s in TEXT_SUFFIXES}}


class DataError(ValueError):
    """Data that cannot be read; the message names the file and the fix."""


def read_documents(paths: list[str], format: str = "auto", text_field: str = "text",
                   split: str = "train") -> Iterator[str]:
    """Every document of every path, in a deterministic order."""
    for path, kind in expand(paths, format):
        try:
            yield from _READERS[kind](path, text_field, split)
        except DataError:
            raise
        except (OSError, UnicodeDecodeError, ValueError, KeyError, ImportError) as e:
            raise DataError(f"cannot read {path} as {kind}: {type(e).__name__}: {e}. Check data.paths and "
                            "data.format.") from e


def expand(paths: list[str], format: str = "auto") -> list[tuple[Path, str]]:
    """(file or dataset directory, format) pairs for data.paths."""
    out = []
    for entry in paths:
        matches = sorted(glob.glob(entry)) if glob.has_magic(entry) else [entry]
        if not matches or not Path(matches[0]).exists():
            raise DataError(f"data.paths: {entry} does not exist (no file or directory, no glob match).")
        for match in map(Path, matches):
            out.extend(_expand_one(match, format))
    if not out:
        raise DataError(f"data.paths={paths} holds no readable files ({', '.join(sorted(SUFFIX_FORMATS))} or "
                        "an HF dataset directory).")
    return out


def _expand_one(path: Path, format: str) -> list[tuple[Path, str]]:
    if path.is_dir():
        if format == "hf_disk" or (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return [(path, "hf_disk")]
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIX_FORMATS)
        return [(p, format if format != "auto" else SUFFIX_FORMATS[p.suffix]) for p in files]
    if format != "auto":
        return [(path, format)]
    if path.suffix not in SUFFIX_FORMATS:
        raise DataError(f"{path}: unknown extension {path.suffix!r}; set data.format to jsonl, parquet or text.")
    return [(path, SUFFIX_FORMATS[path.suffix])]


def _jsonl(path: Path, text_field: str, split: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}:{e.colno}: not valid JSON: {e.msg}: line {number} column {e.colno} "
                                "(each line of a .jsonl file is one JSON object; strings escape newlines and tabs as "
                                "\\n and \\t). Fix or remove that line.") from e
            if not isinstance(record, dict) or text_field not in record:
                raise DataError(f"{path}:{number} has no {text_field!r} key; set data.text_field.")
            yield record[text_field]


def _parquet(path: Path, text_field: str, split: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    if text_field not in parquet.schema_arrow.names:
        raise DataError(f"{path} has no column {text_field!r} (columns: {parquet.schema_arrow.names}); "
                        "set data.text_field.")
    for group in range(parquet.num_row_groups):
        yield from parquet.read_row_group(group, columns=[text_field]).column(0).to_pylist()


def _text(path: Path, text_field: str, split: str) -> Iterator[str]:
    yield path.read_text(encoding="utf-8")


def _hf_disk(path: Path, text_field: str, split: str) -> Iterator[str]:
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(str(path))
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise DataError(f"{path} has splits {list(dataset)}, not {split!r}; set data.split.")
        dataset = dataset[split]
    if text_field not in dataset.column_names:
        raise DataError(f"{path} has no column {text_field!r} (columns: {dataset.column_names}); "
                        "set data.text_field.")
    for batch in dataset.iter(batch_size=1024):
        yield from batch[text_field]


_READERS = {"jsonl": _jsonl, "parquet": _parquet, "text": _text, "hf_disk": _hf_disk}
