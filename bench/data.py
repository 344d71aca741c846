"""Throughput of the data stage against the tokenizer alone, on ~100 MB of real text.

    .venv/bin/python bench/data.py [--mb 100] [--workers 1 2]     (needs `make assets`)

The corpus: the demo's Jane Austen chapters (data/demo/austen) repeated to --mb megabytes of
JSONL, one chapter a document. The reference is what a user would run instead: the demo
tokenizer's (SmolLM2's byte-level BPE, a fast tokenizer) batch encode of the same documents in
one process, 256 documents per call (the Rust tokenizer spreads a batch over every core). Ours:
`python -m recipes.data` as a process of its own with data.workers = each of --workers, the
whole stage (reading the input twice: the survey with its tokenizer check, then the
tokenization; worker start-up; writing the .bin/.idx; the manifest). Prints JSON: tokens/s of
each, tokens/s per worker, and the ratio of our time to the tokenizer's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "data" / "demo"


def build_corpus(folder: Path, mb: int) -> tuple[Path, list[str]]:
    chapters = [json.loads(x)["text"] for x in open(ASSETS / "austen" / "austen.jsonl")]
    docs, size = [], 0
    while size < mb << 20:
        for ch in chapters:
            docs.append(ch)
            size += len(ch.encode())
            if size >= mb << 20:
                break
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return folder, docs


def reference(docs: list[str]) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSETS / "smollm2-135m-instruct")
    t0, n = time.perf_counter(), 0
    for i in range(0, len(docs), 256):
        n += sum(len(x) for x in tok(docs[i:i + 256], add_special_tokens=False)["input_ids"])
    dt = time.perf_counter() - t0
    return {"seconds": round(dt, 2), "tokens": n, "tokens_per_s": round(n / dt)}


def ours(corpus: Path, workers: int, work: Path) -> dict:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "recipes.data", "--config", "conf/demo.yaml",
                    f"run.dir={work}", f"data.input={corpus}", f"data.workers={workers}",
                    "run.log_level=WARNING"], cwd=ROOT, check=True,
                   env={**os.environ, "TQDM_DISABLE": "1"})
    dt = time.perf_counter() - t0
    m = json.loads((work / "data" / "manifest.json").read_text())
    n = sum(m["tokens"].values()) - sum(m["documents"].values())  # less the EODs
    return {"workers": workers, "seconds": round(dt, 2), "tokens": n,
            "tokens_per_s": round(n / dt), "tokens_per_s_per_worker": round(n / dt / workers)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    a = ap.parse_args()
    if not (ASSETS / "austen" / "austen.jsonl").is_file():
        sys.exit("bench/data.py needs the demo's text: make assets")
    with tempfile.TemporaryDirectory() as tmp:
        corpus, docs = build_corpus(Path(tmp) / "corpus", a.mb)
        ref = reference(docs)
        runs = [ours(corpus, w, Path(tmp) / f"w{w}") for w in a.workers]
    out = {"corpus_mb": a.mb, "documents": len(docs), "tokenizer_batch_encode": ref,
           "data_stage": runs, "cpu": os.cpu_count(),
           "time_ratio_ours_over_tokenizer": {r["workers"]: round(r["seconds"] / ref["seconds"], 2)
                                              for r in runs}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
