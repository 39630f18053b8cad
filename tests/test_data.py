"""Readers, tokenizers and packing for `longseq train`: formats, errors naming the file, deterministic order."""

from __future__ import annotations

import json

import numpy as np
import pytest

from longseq.data.packing import build_dataset, pack
from longseq.data.readers import DataError, read_documents
from longseq.data.tokenizer import ByteTokenizer, encode_document, load_tokenizer


def test_pack_restarts_positions_and_ignores_first_tokens():
    tokens, positions = pack([np.arange(5), np.arange(10, 13), np.arange(20, 30)], 6)
    assert tokens.tolist() == [[0, 1, 2, 3, 4, 10], [11, 12, 20, 21, 22, 23], [24, 25, 26, 27, 28, 29]]
    assert positions.tolist() == [[0, 1, 2, 3, 4, 0], [0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]


def _write_docs(tmp_path, texts):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_batch_labels_order_and_epochs(tmp_path):
    path = _write_docs(tmp_path, [f"document {i} " * (i + 1) for i in range(40)])
    kwargs = dict(format="auto", text_field="text", split="train", tokenizer=ByteTokenizer(), seq_len=32, shuffle=True,
                  max_documents=None)
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
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match="bad.jsonl:2 is not valid JSON"):
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
        build_dataset([str(path)], format="auto", text_field="text", split="train", tokenizer=ByteTokenizer(), seq_len=4096,
                      seed=0, shuffle=False, max_documents=None)
