"""Tokenizers for the trainer: a built-in byte tokenizer (no files, no download) or a local Hugging Face one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, then BOS, EOS and PAD: a 259-token vocabulary that needs no files."""

    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258
    vocab_size = 259

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def identity(self) -> dict:
        """What the token cache's key records of this tokenizer."""
        return {"name": "byte", "vocab_size": self.vocab_size}

    def fingerprint(self) -> dict:
        """What a checkpoint records of this tokenizer (tokens mean the same thing if these match)."""
        return self.identity()


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local directory (AutoTokenizer.from_pretrained)."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.path = Path(path)
        self.inner = AutoTokenizer.from_pretrained(path)
        self.bos_token_id = self.inner.bos_token_id
        self.eos_token_id = self.inner.eos_token_id
        self.vocab_size = len(self.inner)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.inner(text, add_special_tokens=False)["input_ids"], dtype=np.int32)

    def decode(self, ids) -> str:
        return self.inner.decode(list(ids))

    def identity(self) -> dict:
        """The directory and its files' names, sizes and modification times (a changed file is another tokenizer)."""
        files = sorted(f for f in self.path.iterdir() if f.is_file())
        return {"name": str(self.path.resolve()), "vocab_size": self.vocab_size,
                "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}

    def fingerprint(self) -> dict:
        """The vocabulary's content, wherever the directory lives (tokens mean the same thing if these match)."""
        vocab = json.dumps(sorted(self.inner.get_vocab().items()))
        return {"vocab_size": self.vocab_size, "vocab_sha256": hashlib.sha256(vocab.encode()).hexdigest()[:16]}


def load_tokenizer(name: str) -> ByteTokenizer | HFTokenizer:
    """'byte' or a local tokenizer directory (data.tokenizer)."""
    if name == "byte":
        return ByteTokenizer()
    if not Path(name).is_dir():
        raise ValueError(
            f"data.tokenizer={name!r} is neither 'byte' nor a local directory. Save the tokenizer with "
            "tokenizer.save_pretrained(DIR) and pass DIR, or use the built-in byte tokenizer."
        )
    return HFTokenizer(name)


def encode_document(tokenizer, text: str) -> np.ndarray:
    """Token ids of one document with BOS in front and EOS at the end (where the tokenizer has them)."""
    ids = tokenizer.encode(text)
    parts = [np.array([t], dtype=np.int32) for t in (tokenizer.bos_token_id,) if t is not None]
    parts.append(ids)
    if tokenizer.eos_token_id is not None:
        parts.append(np.array([tokenizer.eos_token_id], dtype=np.int32))
    return np.concatenate(parts)
