"""Pack tokenized documents into fixed-length rows, and serve them in a deterministic, resumable order.

Documents are concatenated (each with its BOS/EOS) and cut every `seq_len` tokens, so no token is padding. position_ids
restart at 0 where a document starts, and at the start of each row (a document cut at a row end continues in the
next row as if it began there). The label of every position-0 token is IGNORE_INDEX, so no token learns to predict
the first token of another document (shard_batch shifts the labels itself).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
import torch

from longseq.data.readers import DataError, read_documents
from longseq.loss import IGNORE_INDEX
from longseq.data.tokenizer import encode_document, load_tokenizer


@dataclass
class PackedRows:
    """(rows, seq_len) token ids and positions; sample k of the endless stream is row order(epoch)[k % rows]."""

    tokens: np.ndarray
    positions: np.ndarray
    seed: int = 0
    shuffle: bool = True
    _orders: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def rows(self, first: int, count: int) -> np.ndarray:
        """Row indices of samples first .. first+count-1; epoch e is a permutation seeded by (seed, e)."""
        indices = np.arange(first, first + count)
        epochs, offsets = np.divmod(indices, len(self))
        return np.array([self._order(int(e))[o] for e, o in zip(epochs, offsets)], dtype=np.int64)

    def batch(self, first: int, count: int) -> dict:
        """input_ids, position_ids and labels (unshifted) of `count` consecutive samples, as int64 tensors."""
        rows = self.rows(first, count)
        input_ids = torch.from_numpy(self.tokens[rows].astype(np.int64))
        position_ids = torch.from_numpy(self.positions[rows].astype(np.int64))
        labels = input_ids.masked_fill(position_ids == 0, IGNORE_INDEX)
        return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders.clear()
            rng = np.random.default_rng([self.seed, epoch])
            self._orders[epoch] = rng.permutation(len(self)) if self.shuffle else np.arange(len(self))
        return self._orders[epoch]


def pack(documents: Iterable[np.ndarray], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate token arrays and cut them into (rows, seq_len) tokens and positions; the remainder is dropped."""
    documents = [d for d in documents if len(d)]
    if not documents:
        return np.zeros((0, seq_len), np.int32), np.zeros((0, seq_len), np.int32)
    lengths = np.array([len(d) for d in documents])
    rows = int(lengths.sum()) // seq_len
    flat = np.concatenate(documents)[:rows * seq_len]
    starts = np.zeros(len(flat), dtype=bool)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    starts[offsets[offsets < len(flat)]] = True
    starts = starts.reshape(rows, seq_len)
    starts[:, 0] = True
    column = np.arange(seq_len)
    segment_start = np.maximum.accumulate(np.where(starts, column, 0), axis=1)
    return flat.reshape(rows, seq_len), (column - segment_start).astype(np.int32)


def build_dataset(paths: list[str], *, format: str, text_field: str, split: str, tokenizer: str, seq_len: int,
                  seed: int, shuffle: bool, max_documents: int | None) -> PackedRows:
    """Read, tokenize, shuffle (documents, with `seed`) and pack; the same on every rank."""
    tok = load_tokenizer(tokenizer)
    texts = list(islice(read_documents(paths, format, text_field, split), max_documents))
    order = np.random.default_rng(seed).permutation(len(texts)) if shuffle else range(len(texts))
    tokens, positions = pack((encode_document(tok, texts[i]) for i in order), seq_len)
    if len(tokens) == 0:
        total = sum(len(t) for t in texts)
        raise DataError(f"data.paths hold {len(texts)} documents (~{total} characters), not enough for one sequence "
                        f"of data.seq_len={seq_len} tokens. Add data or lower data.seq_len.")
    return PackedRows(tokens, positions, seed=seed, shuffle=shuffle)
