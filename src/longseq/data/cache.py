"""The token cache: a corpus tokenised once into memory-mapped files that every rank of a host shares.

Note [Token cache]
    <cache_dir>/<key>/tokens.bin    uint32 ids of every document (BOS and EOS included), in read order
                      offsets.bin   int64: where each document starts in tokens.bin, then the total (documents + 1)
                      meta.json     documents, tokens, and what the key is made of
    key = sha256 of each input file's path, size and modification time; format, text_field, split, max_documents;
          and the tokenizer's identity
The first process of a host to take the key's lock reads the documents one at a time, tokenises them and appends
them to the files, so building holds one document and one chunk of ids (CHUNK_TOKENS) at a time. It writes into a
temporary directory renamed into place at the end, so no one maps a half-written cache (hosts sharing a file system
may build the same key at once; the later rename loses and is dropped). Every rank then maps the files: the page
cache holds one copy per host, and a rank's own memory holds what it reads (its rows) and 16 bytes per document for
the packing order (data/packing.py). A changed input file changes the key, so the cache is rebuilt.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from longseq.data.readers import expand, read_documents
from longseq.data.tokenizer import encode_document

CHUNK_TOKENS = 1 << 18
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TokenCache:
    """A built cache, mapped read-only: `tokens` (uint32) and `offsets` (int64, documents + 1)."""

    directory: Path
    tokens: np.ndarray
    offsets: np.ndarray

    @property
    def documents(self) -> int:
        return len(self.offsets) - 1


def default_cache_dir() -> Path:
    """$LONGSEQ_CACHE_DIR, else ~/.cache/longseq/tokens."""
    configured = os.environ.get("LONGSEQ_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "longseq" / "tokens"


def open_token_cache(paths: list[str], *, format: str, text_field: str, split: str, max_documents: int | None,
                     tokenizer, cache_dir: Path | None = None) -> TokenCache:
    """The cache of these documents under this tokenizer, built first if no process has built it yet."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    recipe = {"version": FORMAT_VERSION, "files": [_file_identity(p, kind) for p, kind in expand(paths, format)],
              "text_field": text_field, "split": split, "max_documents": max_documents,
              "tokenizer": tokenizer.identity()}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:20]
    directory = cache_dir / key
    if not (directory / "meta.json").exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        with open(cache_dir / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (directory / "meta.json").exists():
                _build(directory, recipe, paths, format, tokenizer)
    return _map(directory)


def _file_identity(path: Path, kind: str) -> list:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [str(path.resolve()), kind, [[str(f.relative_to(path)) if path.is_dir() else f.name, f.stat().st_size,
                                         f.stat().st_mtime_ns] for f in files]]


def _build(directory: Path, recipe: dict, paths: list[str], format: str, tokenizer) -> None:
    """Tokenise every document into a temporary directory, then rename it to `directory`."""
    if os.environ.get("RANK", "0") == "0":
        print(f"longseq: tokenizing {len(recipe['files'])} input(s) once into {directory}", file=sys.stderr,
              flush=True)
    partial = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
    documents = islice(read_documents(paths, format, recipe["text_field"], recipe["split"]),
                       recipe["max_documents"])
    count, total = 0, 0
    with open(partial / "tokens.bin", "wb") as tokens, open(partial / "offsets.bin", "wb") as offsets:
        pending, pending_tokens, starts = [], 0, [0]
        for text in documents:
            ids = encode_document(tokenizer, text).astype(np.uint32)
            pending.append(ids)
            pending_tokens += len(ids)
            total += len(ids)
            count += 1
            starts.append(total)
            if pending_tokens >= CHUNK_TOKENS:
                _flush(tokens, offsets, pending, starts)
                pending, pending_tokens, starts = [], 0, []
        _flush(tokens, offsets, pending, starts)
    (partial / "meta.json").write_text(json.dumps({"documents": count, "tokens": total, "recipe": recipe}))
    try:
        os.rename(partial, directory)
    except OSError:  # another host built it first (shared file system)
        shutil.rmtree(partial, ignore_errors=True)


def _flush(tokens, offsets, pending: list[np.ndarray], starts: list[int]) -> None:
    if pending:
        tokens.write(np.concatenate(pending).tobytes())
    offsets.write(np.asarray(starts, dtype=np.int64).tobytes())


def _map(directory: Path) -> TokenCache:
    meta = json.loads((directory / "meta.json").read_text())
    offsets = np.memmap(directory / "offsets.bin", dtype=np.int64, mode="r")  # never empty: it ends with the total
    tokens = np.memmap(directory / "tokens.bin", dtype=np.uint32, mode="r") if meta["tokens"] else \
        np.zeros(0, np.uint32)
    return TokenCache(directory, tokens, offsets)
