"""Synthetic corpora with learnable structure, for tests (tiny tokenizer: one char = one token)."""
from __future__ import annotations

import json
import random
from pathlib import Path

ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def write_corpus(folder: Path, n_docs: int = 120, seed: int = 0) -> Path:
    """JSONL documents of alphabet runs ('defgh...') with occasional restarts and a .txt file:
    next-character prediction is easy to learn, so a briefly trained model has structure."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "docs.jsonl", "w") as f:
        for _ in range(n_docs):
            out, i = [], rng.randrange(26)
            while len(out) < 200:
                out.append(ALPHABET[i % 26])
                i = rng.randrange(26) if rng.random() < 0.1 else i + 1
            f.write(json.dumps({"text": "".join(out)}) + "\n")
    (folder / "extra.txt").write_text("".join(ALPHABET[i % 26] for i in range(300)))
    return folder
