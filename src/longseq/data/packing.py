"""Pack tokenized documents into fixed-length rows, and serve them in a deterministic, resumable order.

Documents are shuffled (seeded), concatenated (each with its BOS/EOS) and cut every `seq_len` tokens, so no token is
padding; the remainder is dropped. position_ids restart at 0 where a document starts, and at the start of each row (a
document cut at a row end continues in the next row as if it began there). The label of every position-0 token is
IGNORE_INDEX, so no token learns to predict the first token of another document (shard_batch shifts the labels
itself). Rows are cut lazily from the token cache (Note [Token cache]): only the rows a rank reads are in its memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from longseq.data.cache import open_token_cache
from longseq.data.readers import DataError
from longseq.loss import IGNORE_INDEX


@dataclass
class PackedRows:
    """Rows of `seq_len` tokens cut from documents (`tokens`, split at `offsets`) concatenated in a seeded order;
    sample k of the endless stream is row order(epoch)[k % rows]."""

    tokens: np.ndarray
    offsets: np.ndarray
    seq_len: int
    seed: int = 0
    shuffle: bool = True
    _orders: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        count = len(self.offsets) - 1
        self.order = np.random.default_rng(self.seed).permutation(count) if self.shuffle else np.arange(count)
        lengths = np.diff(np.asarray(self.offsets))[self.order]
        self.starts = np.concatenate([[0], np.cumsum(lengths)])  # where each document of the order starts
        self.count = int(self.starts[-1]) // self.seq_len

    def __len__(self) -> int:
        return self.count

    @property
    def documents(self) -> int:
        return len(self.order)

    @property
    def total_tokens(self) -> int:
        return int(self.starts[-1])

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and position_ids of packed row `index` (int64)."""
        first, end = index * self.seq_len, (index + 1) * self.seq_len
        ids, positions = np.empty(self.seq_len, np.int64), np.empty(self.seq_len, np.int64)
        k = int(np.searchsorted(self.starts, first, side="right")) - 1
        at = first
        while at < end:
            begin, stop = at - self.starts[k], min(end, self.starts[k + 1]) - self.starts[k]
            source = int(self.offsets[self.order[k]])
            piece = slice(at - first, at - first + stop - begin)
            ids[piece] = self.tokens[source + begin:source + stop]
            positions[piece] = np.arange(stop - begin)
            at += stop - begin
            k += 1
        return ids, positions

    def rows(self, first: int, count: int) -> np.ndarray:
        """Row indices of samples first .. first+count-1; epoch e is a permutation seeded by (seed, e)."""
        indices = np.arange(first, first + count)
        epochs, offsets = np.divmod(indices, len(self))
        return np.array([self._order(int(e))[o] for e, o in zip(epochs, offsets)], dtype=np.int64)

    def batch(self, first: int, count: int) -> dict:
        """input_ids, position_ids and labels (unshifted) of `count` consecutive samples, as int64 tensors."""
        ids, positions = zip(*(self.row(int(r)) for r in self.rows(first, count)))
        input_ids, position_ids = torch.from_numpy(np.stack(ids)), torch.from_numpy(np.stack(positions))
        labels = input_ids.masked_fill(position_ids == 0, IGNORE_INDEX)
        return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders.clear()
            rng = np.random.default_rng([self.seed, epoch])
            self._orders[epoch] = rng.permutation(len(self)) if self.shuffle else np.arange(len(self))
        return self._orders[epoch]


def build_dataset(paths: list[str], *, format: str, text_field: str, split: str, tokenizer, seq_len: int,
                  seed: int, shuffle: bool, max_documents: int | None, cache_dir=None,
                  field: str = "data.paths") -> PackedRows:
    """The packed rows of these documents under `tokenizer` (load_tokenizer's), through the token cache in
    `cache_dir` (None: default_cache_dir()); the same on every rank. `field` names the paths in errors."""
    cache = open_token_cache(paths, format=format, text_field=text_field, split=split, max_documents=max_documents,
                             tokenizer=tokenizer, cache_dir=cache_dir)
    rows = PackedRows(cache.tokens, cache.offsets, seq_len, seed=seed, shuffle=shuffle)
    if len(rows) == 0:
        raise DataError(f"{field} hold {rows.documents} documents ({rows.total_tokens} tokens), not enough for one "
                        f"sequence of data.seq_len={seq_len} tokens. Add data or lower data.seq_len.")
    return rows
