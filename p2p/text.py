"""Text for next-character prediction (`--data.name text`), offline: any UTF-8 file, by default the
documentation that ships with Python itself (pydoc_data/topics.py, ~465 k characters of English in 79 topics).

The corpus is cut into three contiguous blocks, train | validation | test, so no window of one block overlaps
another. A sample is a window of `seq_len` characters x and the same window shifted by one, y. Each training
window's label is the document it starts in, so the generic partitions split the windows: `iid` deals random
windows of the whole training block, `documents` deals whole documents (the corpus's topics), so every node's
text differs in content (the non-IID split of federated and decentralized language-model work).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from p2p.config import ConfigError, DataConfig

TEST_FRACTION = 0.05  # the corpus's last 5 % is the test block (the validation block, val_fraction, before it)


class Windows(Dataset):
    """(x, y) = (ids[s : s + T], ids[s + 1 : s + T + 1]) for each start s: next-token targets for every position."""

    def __init__(self, ids: torch.Tensor, starts: np.ndarray, seq_len: int):
        self.ids, self.starts, self.T = ids, torch.as_tensor(starts, dtype=torch.long), seq_len

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = int(self.starts[i])
        return self.ids[s:s + self.T], self.ids[s + 1:s + self.T + 1]


def corpus(cfg: DataConfig) -> list[str]:
    """The documents, in a fixed order: pydoc's topics by name, or a file's paragraphs (split at blank lines)."""
    if not cfg.path:
        from pydoc_data.topics import topics

        return [topics[name] for name in sorted(topics)]
    path = Path(cfg.path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--data.path {path}: cannot be read as UTF-8 text ({e})") from None
    documents = [d for d in re.split(r"\n\s*\n", text) if d.strip()]
    if not documents:
        raise ConfigError(f"--data.path {path} holds no text")
    return documents


def vocabulary(text: str, kind: str) -> tuple[list[str] | None, int]:
    """(the sorted characters of the text, or None for bytes, and the vocabulary size): the same on every rank."""
    if kind == "byte":
        return None, 256
    chars = sorted(set(text))
    return chars, len(chars)


def encode(text: str, chars: list[str] | None) -> torch.Tensor:
    if chars is None:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    index = {c: i for i, c in enumerate(chars)}
    return torch.tensor([index[c] for c in text], dtype=torch.long)


def load_text(cfg: DataConfig) -> tuple[Windows, np.ndarray, Windows, Windows, int]:
    """(train windows, their document labels, validation windows, test windows, vocabulary size)."""
    documents = corpus(cfg)
    text = "\n\n".join(documents)
    chars, vocab = vocabulary(text, cfg.vocab)
    ids = encode(text, chars)
    doc_of = np.repeat(np.arange(len(documents)), [len(encode(d + "\n\n", chars)) for d in documents])[:len(ids)]
    T, n = cfg.seq_len, len(ids)
    test_start = int(n * (1 - TEST_FRACTION))
    val_start = int(test_start - n * cfg.val_fraction)
    too_short = test_start - val_start < (T + 1) * int(cfg.val_fraction > 0) or n - test_start < T + 1
    if val_start < 2 * (T + 1) or too_short:
        raise ConfigError(f"the corpus ({n} tokens) is too short for --data.seq_len {T}: lower it or use more text")

    def starts(a: int, b: int) -> np.ndarray:  # non-overlapping windows inside [a, b), each with its shifted target
        return np.arange(a, b - T - 1 + 1, T)

    train_starts = starts(0, val_start)
    return (Windows(ids, train_starts, T), doc_of[train_starts], Windows(ids, starts(val_start, test_start), T),
            Windows(ids, starts(test_start, n), T), vocab)
