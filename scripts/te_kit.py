"""An offline Transformer Engine kit for a GPU host without network (the lent H200, air-gapped
clusters): built here, carried over in parts small enough for a 64 MiB transfer, checked and
installed there.

    python scripts/te_kit.py build   [--dest .te-kit] [--te 2.20.2] [--python 3.12]
                                     [--torch 2.11.0+cu130] [--cuda 13.0] [--arch 90]
    python scripts/te_kit.py verify  [--kit .te-kit]            # every part, and the whole
    python scripts/te_kit.py install [--kit .te-kit] [--jobs 16] # there: checks the machine too

What a kit holds: `transformer-engine-cu13` (the core library, one 276.5 MB wheel),
`transformer-engine` (the Python package) and the `transformer-engine-torch` sdist, which has no
wheel: it compiles against the host's own torch, so `install` builds it there with nvcc and
the cuDNN headers of the host's `nvidia-cudnn-cu13` wheel (NVTE_CUDA_ARCHS=<arch>, --jobs
parallel jobs). The files go into one tar, cut into parts of at most 55 MiB, each in a folder of
its own (`part-00/`, `part-01/`, ...: one folder per transfer); `manifest.json` records the
sha256 and size of every part and of the whole tar, each file's sha256 (from the index), and
what the kit was built for (Python, torch, CUDA, GPU architecture). `install` refuses a missing
or damaged part by name, and a machine that differs from the manifest, before installing
anything.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

PART_BYTES = 55 << 20
INDEX = "https://pypi.org/simple"
PLATFORM = "manylinux_2_28_x86_64"


class KitError(Exception):
    """A kit that cannot be used here: the message names the part, the file or the machine."""


def sha256(data_or_path) -> str:
    h = hashlib.sha256()
    if isinstance(data_or_path, (bytes, bytearray)):
        h.update(data_or_path)
        return h.hexdigest()
    with open(data_or_path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


# ---- build (here) -------------------------------------------------------------------------
def fetch_sdist(name: str, version: str, dest: Path) -> Path:
    """The sdist of `name==version` from the index's JSON simple API, its sha256 checked."""
    req = urllib.request.Request(f"{INDEX}/{name}/",
                                 headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    files = json.load(urllib.request.urlopen(req, timeout=120))["files"]
    want = f"{name.replace('-', '_')}-{version}.tar.gz"
    f = next((x for x in files if x["filename"] == want), None)
    if f is None:
        raise KitError(f"{want} is not on {INDEX}")
    out = dest / want
    with urllib.request.urlopen(f["url"], timeout=600) as r, open(out, "wb") as w:
        shutil.copyfileobj(r, w)
    if sha256(out) != f["hashes"]["sha256"]:
        raise KitError(f"{want}: downloaded bytes do not match the index's sha256")
    return out


def download(te: str, python: str, dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
                    "--platform", PLATFORM, "-d", str(dest), f"transformer-engine-cu13=={te}",
                    f"transformer-engine=={te}"], check=True)
    fetch_sdist("transformer-engine-torch", te, dest)
    return sorted(dest.iterdir())


def pack(files: list[Path], dest: Path, built_for: dict, part_bytes: int = PART_BYTES) -> dict:
    """The files as one tar cut into parts (dest/part-NN/kit.tar.NN) and dest/manifest.json,
    written last."""
    dest.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for f in files:
            tar.add(f, arcname=f.name)
    whole = buf.getvalue()
    parts = []
    for i in range(0, max(len(whole), 1), part_bytes):
        chunk = whole[i:i + part_bytes]
        folder = dest / f"part-{len(parts):02d}"
        folder.mkdir(exist_ok=True)
        path = folder / f"kit.tar.{len(parts):02d}"
        path.write_bytes(chunk)
        parts.append({"path": str(path.relative_to(dest)), "bytes": len(chunk),
                      "sha256": sha256(chunk)})
    manifest = {"built_for": built_for, "files": {f.name: sha256(f) for f in files},
                "parts": parts, "tar": {"bytes": len(whole), "sha256": sha256(whole)}}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


# ---- there: verify, check the machine, install ---------------------------------------------
def assemble(kit: Path, out: Path) -> list[Path]:
    """Every part checked (present, its size and sha256), the tar rebuilt and checked as a
    whole, its files extracted into `out` and checked against the manifest."""
    mf = kit / "manifest.json"
    if not mf.is_file():
        raise KitError(f"{mf} is missing: carry the kit's manifest.json with its parts")
    m = json.loads(mf.read_text())
    data = bytearray()
    for p in m["parts"]:
        path = kit / p["path"]
        if not path.is_file():
            raise KitError(f"part {p['path']} is missing: carry {Path(p['path']).parent}/ too")
        chunk = path.read_bytes()
        if len(chunk) != p["bytes"] or sha256(chunk) != p["sha256"]:
            raise KitError(f"part {p['path']} is damaged ({len(chunk)} bytes, sha256 "
                           f"{sha256(chunk)[:12]}..., the manifest says {p['bytes']} bytes, "
                           f"{p['sha256'][:12]}...): carry it again")
        data += chunk
    if sha256(data) != m["tar"]["sha256"]:
        raise KitError("the reassembled kit does not match its manifest: rebuild the kit")
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        tar.extractall(out, filter="data")
    files = [out / name for name in m["files"]]
    for f in files:
        if sha256(f) != m["files"][f.name]:
            raise KitError(f"{f.name} in the kit does not match its manifest")
    return files


def this_machine() -> dict:
    import torch

    cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    return {"python": ".".join(map(str, sys.version_info[:2])), "torch": torch.__version__,
            "cuda": torch.version.cuda, "arch": f"{cap[0]}{cap[1]}" if cap else None}


def check_machine(built_for: dict, here: dict) -> None:
    """The kit's Python, torch, CUDA and GPU architecture against this machine's."""
    diff = {k: (built_for.get(k), here.get(k)) for k in ("python", "torch", "cuda", "arch")
            if built_for.get(k) is not None and str(built_for.get(k)) != str(here.get(k))}
    if diff:
        raise KitError("this machine differs from the one the kit was built for: "
                       + ", ".join(f"{k} {a} (kit) vs {b} (here)" for k, (a, b) in diff.items())
                       + "; rebuild it with scripts/te_kit.py build --python/--torch/--cuda/--arch")


def install(kit: Path, jobs: int, python: str = sys.executable) -> None:
    m = json.loads((kit / "manifest.json").read_text()) if (kit / "manifest.json").is_file() \
        else None
    with tempfile.TemporaryDirectory() as tmp:
        files = assemble(kit, Path(tmp))  # parts first: a damaged kit is named before anything
        check_machine(m["built_for"], this_machine())
        wheels = [str(f) for f in files if f.suffix == ".whl"]
        subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", *wheels],
                       check=True)
        sdist = next(f for f in files if f.name.startswith("transformer_engine_torch"))
        import nvidia.cudnn  # the host's cuDNN wheel: its headers and libraries

        cudnn = Path(nvidia.cudnn.__path__[0])
        env = {**os.environ, "NVTE_FRAMEWORK": "pytorch", "MAX_JOBS": str(jobs),
               "NVTE_CUDA_ARCHS": m["built_for"]["arch"], "CUDNN_PATH": str(cudnn),
               "CUDNN_HOME": str(cudnn)}
        subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index",
                        "--no-build-isolation", str(sdist)], check=True, env=env)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--dest", default=".te-kit")
    b.add_argument("--te", default="2.20.2")
    b.add_argument("--python", default="3.12")
    b.add_argument("--torch", default="2.11.0+cu130")
    b.add_argument("--cuda", default="13.0")
    b.add_argument("--arch", default="90")
    for name in ("verify", "install"):
        s = sub.add_parser(name)
        s.add_argument("--kit", default=".te-kit")
        s.add_argument("--jobs", type=int, default=os.cpu_count())
    a = ap.parse_args(argv)
    try:
        if a.cmd == "build":
            with tempfile.TemporaryDirectory() as tmp:
                files = download(a.te, a.python, Path(tmp))
                m = pack(files, Path(a.dest), {"python": a.python, "torch": a.torch,
                                               "cuda": a.cuda, "arch": a.arch, "te": a.te})
            print(f"te_kit: {len(m['parts'])} parts, {m['tar']['bytes'] / 2**20:.1f} MiB in "
                  f"{a.dest}: carry each part-NN/ and manifest.json")
        elif a.cmd == "verify":
            with tempfile.TemporaryDirectory() as tmp:
                print(f"te_kit: {len(assemble(Path(a.kit), Path(tmp)))} files verified")
        else:
            install(Path(a.kit), a.jobs)
            print("te_kit: Transformer Engine installed")
    except KitError as e:
        print(f"te_kit: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
