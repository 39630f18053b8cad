"""Readers, tokenizers and packing for `longseq train`: formats, errors naming the file, deterministic order."""

from __future__ import annotations

import json

import numpy as np
import pytest

from longseq.data.packing import PackedRows, build_dataset
from longseq.data.readers import DataError, read_documents
from longseq.data.tokenizer import ByteTokenizer, encode_document, load_tokenizer


def _packed(documents: list[np.ndarray], seq_len: int, **kwargs) -> PackedRows:
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in documents])]).astype(np.int64)
    return PackedRows(np.concatenate(documents).astype(np.uint32), offsets, seq_len, **kwargs)


def test_pack_restarts_positions_and_ignores_first_tokens():
    data = _packed([np.arange(5), np.arange(10, 13), np.zeros(0), np.arange(20, 31)], 6, shuffle=False)
    assert len(data) == 3  # 19 tokens: the last one is dropped
    rows = [data.row(i) for i in range(3)]
    assert [r[0].tolist() for r in rows] == [[0, 1, 2, 3, 4, 10], [11, 12, 20, 21, 22, 23], [24, 25, 26, 27, 28, 29]]
    assert [r[1].tolist() for r in rows] == [[0, 1, 2, 3, 4, 0], [0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]


def test_shuffled_rows_are_the_concatenation_in_the_seeded_order():
    """Rows cut lazily equal the shuffled documents concatenated and cut every seq_len tokens."""
    rng = np.random.default_rng(0)
    documents = [rng.integers(0, 259, int(n)) for n in rng.integers(1, 40, 50)]
    data = _packed(documents, 16, seed=7)
    flat = np.concatenate([documents[i] for i in np.random.default_rng(7).permutation(50)])
    for index in range(len(data)):
        ids, positions = data.row(index)
        assert ids.tolist() == flat[index * 16:(index + 1) * 16].tolist()
        starts = np.flatnonzero(positions == 0)
        assert starts[0] == 0 and all(positions[a:b].tolist() == list(range(b - a))
                                      for a, b in zip(starts, [*starts[1:], 16]))


def _write_docs(tmp_path, texts):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_batch_labels_order_and_epochs(tmp_path):
    path = _write_docs(tmp_path, [f"document {i} " * (i + 1) for i in range(40)])
    kwargs = dict(format="auto", text_field="text", split="train", tokenizer=ByteTokenizer(), seq_len=32, shuffle=True,
                  max_documents=None, cache_dir=tmp_path / "cache")
    data = build_dataset([str(path)], seed=3, **kwargs)
    again = build_dataset([str(path)], seed=3, **kwargs)
    other = build_dataset([str(path)], seed=4, **kwargs)
    batch = data.batch(5, 4)
    assert (batch["labels"] == -100).equal(batch["position_ids"] == 0)
    assert batch["input_ids"].equal(again.batch(5, 4)["input_ids"])
    assert not batch["input_ids"].equal(other.batch(5, 4)["input_ids"])
    epoch_two = data.rows(len(data), len(data))
    assert sorted(epoch_two.tolist()) == list(range(len(data)))
    assert not np.array_equal(epoch_two, data.rows(0, len(data)))


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = encode_document(tok, "héllo")
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids) == "héllo"


def test_formats(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pyarrow.table({"body": ["p1", "p2"]}), tmp_path / "a.parquet")
    (tmp_path / "b.txt").write_text("plain")
    (tmp_path / "c.jsonl").write_text('{"body": "j1"}\n\n{"body": "j2"}\n')
    assert list(read_documents([str(tmp_path)], text_field="body")) == ["p1", "p2", "plain", "j1", "j2"]
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": ["h1", "h2"]})}).save_to_disk(tmp_path / "hf")
    assert list(read_documents([str(tmp_path / "hf")], text_field="body")) == ["h1", "h2"]
    with pytest.raises(DataError, match="not 'valid'; set data.split"):
        list(read_documents([str(tmp_path / "hf")], text_field="body", split="valid"))


def test_unreadable_data_names_the_file(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl does not exist"):
        list(read_documents([str(tmp_path / "missing.jsonl")]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "a\tb"}\n')
    with pytest.raises(DataError, match="bad.jsonl:2:12: not valid JSON: Invalid control character at: line 2 "
                                        r"column 12 \(each line"):
        list(read_documents([str(bad)]))
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9")
    with pytest.raises(DataError, match="cannot read .*latin.txt as text"):
        list(read_documents([str(tmp_path / "latin.txt")]))
    with pytest.raises(DataError, match="no 'content' key; set data.text_field"):
        list(read_documents([str(bad)], text_field="content"))
    with pytest.raises(ValueError, match="neither 'byte' nor a local directory"):
        load_tokenizer("no/such/tokenizer")


def test_too_little_data(tmp_path):
    path = _write_docs(tmp_path, ["tiny"])
    with pytest.raises(DataError, match="not enough for one sequence of data.seq_len=4096"):
        build_dataset([str(path)], format="auto", text_field="text", split="train", tokenizer=ByteTokenizer(),
                      seq_len=4096, seed=0, shuffle=False, max_documents=None, cache_dir=tmp_path / "cache")


def test_token_cache_is_built_once_and_rebuilt_when_a_file_changes(tmp_path, monkeypatch):
    from longseq.data import cache

    path = _write_docs(tmp_path, [f"doc {i}" for i in range(5)])
    kwargs = dict(format="auto", text_field="text", split="train", max_documents=None, tokenizer=ByteTokenizer(),
                  cache_dir=tmp_path / "cache")
    first = cache.open_token_cache([str(path)], **kwargs)
    assert first.documents == 5 and first.tokens.dtype == np.uint32 and isinstance(first.tokens, np.memmap)
    assert first.tokens[:7].tolist() == encode_document(ByteTokenizer(), "doc 0").tolist()
    monkeypatch.setattr(cache, "_build", lambda *args: pytest.fail("the cache was built twice"))
    assert cache.open_token_cache([str(path)], **kwargs).directory == first.directory
    monkeypatch.undo()
    _write_docs(tmp_path, [f"doc {i}" for i in range(6)])
    assert cache.open_token_cache([str(path)], **kwargs).documents == 6
    assert cache.open_token_cache([str(path)], **{**kwargs, "max_documents": 2}).documents == 2


def test_a_corpus_larger_than_the_memory_budget_streams(tmp_path, monkeypatch):
    """8 MB of text (32 MB of uint32 ids) goes through the cache and out as batches while Python holds under 3 MB:
    the budget of a rank that could not hold the corpus, or its ids, in memory (in-memory packing needs ~40 MB)."""
    import tracemalloc

    from longseq.data import cache

    monkeypatch.setattr(cache, "CHUNK_TOKENS", 1 << 16)
    path = tmp_path / "big.jsonl"
    line = "x = [i * i for i in range(10)]  # a line of code\n" * 20
    with open(path, "w") as f:
        for i in range(8 * 2**20 // len(line)):
            f.write(json.dumps({"text": f"# document {i}\n{line}"}) + "\n")
    budget = 3 * 2**20
    tracemalloc.start()
    try:
        data = build_dataset([str(path)], format="auto", text_field="text", split="train", tokenizer=ByteTokenizer(),
                             seq_len=4096, seed=0, shuffle=True, max_documents=None, cache_dir=tmp_path / "cache")
        for first in range(0, 64, 8):
            batch = data.batch(first, 8)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert data.total_tokens > 8 * 2**20 and peak < budget, (data.total_tokens, peak)
    assert batch["input_ids"].shape == (8, 4096) and (batch["labels"] == -100).equal(batch["position_ids"] == 0)
