"""An offline Transformer Engine kit for a GPU host without network (the lent H200, air-gapped
clusters): built here, carried over in one part (or a few) small enough for a 64 MiB transfer,
checked and installed there.

    python scripts/te_kit.py describe > host.json                # there: what the kit is for
    python scripts/te_kit.py build   [--dest .te-kit] [--for host.json] [--te 2.20.2]
                                     [--python 3.12] [--torch 2.11.0+cu130] [--cuda 13.0]
                                     [--arch 90] [--with pydantic,...] [--all-archs]
                                     [--no-prebuild] [--build-dir .te-kit-build]
    python scripts/te_kit.py verify  [--kit .te-kit]            # every part, and the whole
    python scripts/te_kit.py install [--kit .te-kit] [--jobs 16] # there: checks the machine too
    python scripts/te_kit.py kernels                            # there: TE's kernels vs torch

Which host a kit is for: `--for host.json`, what `describe` printed on that host (its venv's
Python, torch, CUDA and GPU architecture: `make setup TORCH=cuda TE=none` there first), or the
machine `build` runs on when it has a CUDA torch and a GPU; --python/--torch/--cuda/--arch
override single values. A build that can tell neither refuses, naming these ways.

What a kit holds: `transformer-engine-cu13` (the core library: a 276.5 MB wheel with CUDA code
for nine GPU architectures, slimmed here to the host's, --arch, unless --all-archs: ~32 MB, see
`slim`), `transformer-engine` (the Python package), the `transformer-engine-torch` sdist (PyPI
has no wheel of it: a C++ extension compiled against one torch), unless --no-prebuild that
extension built here as a wheel for the host's exact torch, and the pinned wheels of what TE
imports that a GPU image may lack (`EXTRAS`, --with: pydantic), installed there only where
missing. The files go into one tar, cut into
parts of at most 55 MiB, each in a folder of its own (`part-00/`, ...: one folder per
transfer); `manifest.json` records the sha256 and size of every part and of the whole tar, each
file's sha256, and what the kit was built for (Python, torch and its git commit, CUDA, GPU
architecture, and what slimming kept and dropped). `install` refuses a missing or damaged part
by name, and a machine that differs from the manifest, before installing anything; `kernels`
then runs TE's kernels once on the GPU against torch's results.

Where the extension is built: here, on the CPU machine (`prebuild`): a venv of the host's
Python (python3.12 on PATH or pyenv's) with PyPI's torch of the host's version (torch 2.11.0 on
PyPI is the cu130 build) and the CUDA headers of the `cuda-toolkit` wheels torch pins (nvcc and
CCCL extras); 33 C++ files, no CUDA kernels (those are in the core wheel): 6.6-8.6 min on a
2-core machine, with the ~5.5 GB of wheels the venv needs downloaded once into --build-dir.
The wheel is imported (`import torch, transformer_engine.pytorch`, all symbols bound, with the
slimmed core library) before it goes into the kit. On the GPU host `install` then only unpacks
wheels: seconds of device time instead of a compile (~1 min on 16 cores, and a build that needs
the same header fixes there). If the host's torch is another commit, or the prebuilt extension
does not import there, `install` builds the sdist on the host instead (NVTE_CUDA_ARCHS=<arch>,
--jobs jobs).
"""
from __future__ import annotations

import argparse
import base64
import collections
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

PART_BYTES = 55 << 20
INDEX = "https://pypi.org/simple"
PLATFORM = "manylinux_2_28_x86_64"
CUOBJDUMP = "nvidia-cuda-cuobjdump==13.2.78"  # reads CUDA 13.0's fatbins
PLATFORMS = [PLATFORM, "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
# What `import transformer_engine.pytorch` loads beyond torch's own requirements and a GPU
# image's usual packages (einops, onnx, numpy: on the lent H200): pydantic, for its recipes.
# The kit carries these wheels (versions from requirements.lock) and `install` installs those
# whose module does not import on the host. `--with` names others.
EXTRAS = ["pydantic", "pydantic-core", "annotated-types", "typing-inspection"]


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


def fetch_cuobjdump(build_dir: Path) -> str:
    """NVIDIA's cuobjdump (the nvidia-cuda-cuobjdump wheel, pinned), for checking a slimmed
    library; kept in the build folder."""
    tool = build_dir / "cuobjdump" / "nvidia" / "cu13" / "bin" / "cuobjdump"
    if not tool.exists():
        wheels = build_dir / "cuobjdump-wheel"
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--only-binary=:all:", "--platform", "manylinux_2_17_x86_64", "-d",
                        str(wheels), CUOBJDUMP], check=True)
        (whl,) = wheels.glob("nvidia_cuda_cuobjdump-*.whl")
        with zipfile.ZipFile(whl) as z:
            z.extractall(tool.parents[3])
        tool.chmod(0o755)
    return str(tool)


def pinned(name: str, root: Path = Path(__file__).resolve().parents[1]) -> str:
    """`name==version` as requirements.lock (or requirements-engine.txt) pins it."""
    norm = lambda n: re.sub(r"[-_.]+", "-", n.lower())  # noqa: E731
    for f in ("requirements.lock", "requirements-engine.txt"):
        for line in (root / f).read_text().splitlines():
            if "==" in line and norm(line.split("==")[0].strip()) == norm(name):
                return line.split(";")[0].strip()
    raise KitError(f"{name} is not pinned in requirements.lock: pin it to carry it in the kit")


def download(te: str, python: str, dest: Path, extras: list[str] = ()) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", python, "--implementation", "cp", "-d", str(dest)]
    subprocess.run(pip + ["--platform", PLATFORM, f"transformer-engine-cu13=={te}",
                          f"transformer-engine=={te}"], check=True)
    if extras:
        subprocess.run(pip + [a for p in PLATFORMS for a in ("--platform", p)]
                       + [pinned(n) for n in extras], check=True)
    fetch_sdist("transformer-engine-torch", te, dest)
    return sorted(dest.iterdir())


def is_te(f: Path) -> bool:
    return f.name.startswith("transformer_engine")


def top_modules(whl: Path) -> list[str]:
    """The names a wheel's files make importable (its top-level packages and modules)."""
    with zipfile.ZipFile(whl) as z:
        names = {n.split("/")[0] for n in z.namelist()}
    return sorted({n.split(".")[0] for n in names
                   if not n.endswith((".dist-info", ".data", ".pth"))})


def build_env(site: Path, arch: str, jobs: int) -> dict:
    """Environment for compiling the transformer-engine-torch sdist against the torch and the
    nvidia-* CUDA wheels under `site` (site-packages): never try GitHub for a wheel, take the
    headers from the wheels, CCCL (nv/target) on the C++ include path, cuDNN from its wheel."""
    nv = site / "nvidia"
    cccl = [str(p) for p in nv.glob("*/include/cccl")]
    cudnn = nv / "cudnn"
    return {**os.environ, "NVTE_FRAMEWORK": "pytorch", "NVTE_PYTORCH_FORCE_BUILD": "TRUE",
            "NVTE_BUILD_USE_NVIDIA_WHEELS": "1", "NVTE_CUDA_ARCHS": arch, "MAX_JOBS": str(jobs),
            "CUDNN_PATH": str(cudnn), "CUDNN_HOME": str(cudnn),
            "CPLUS_INCLUDE_PATH": os.pathsep.join(
                cccl + [os.environ.get("CPLUS_INCLUDE_PATH", "")]).strip(os.pathsep)}


# ---- slimming the core library to the host's GPU architecture -------------------------------
# libtransformer_engine.so carries its CUDA kernels as fatbins (section .nv_fatbin) for nine
# architectures (sm_75 ... sm_120): 251 of its 343 MB, of which 17.5 MB are Hopper's sm_90. A
# fatbin is a run of containers (a header: magic, version, header size, payload size) of entries
# (kind: 2 = ELF/SASS, 1 = PTX; payload size; the architecture at byte 28). `slim` keeps, in each
# container, the entries the given GPU can load (SASS of its major version up to its own, PTX up
# to its own) and drops the others: the container then holds what nvcc would have written for
# NVTE_CUDA_ARCHS=<arch>, at the same address (the code that registers it points there), and the
# freed bytes are zeros that the wheel's compression takes to nothing (the kit: 266.4 MiB in
# five parts -> 33.5 MiB in one). The kept bytes are not changed: `slim_wheel` re-reads them,
# and the build checks them again with NVIDIA's cuobjdump.
FATBIN_MAGIC = 0xBA55ED50


def elf_section(data, name: str) -> tuple[int, int] | None:
    """(file offset, size) of section `name` in a little-endian ELF64 image, or None."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise KitError("not a little-endian 64-bit ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx][4]
    for sh_name, _, _, _, offset, size in headers:
        end = data.index(b"\0", strtab + sh_name)
        if bytes(data[strtab + sh_name:end]) == name.encode():
            return offset, size
    return None


def fatbin_containers(data, start: int, size: int):
    """Each container of the fatbin section at data[start:start+size]: (its offset, header
    size, [(entry offset, entry length with its header, kind, arch)]). Zeros between containers
    are alignment; anything else is refused."""
    pos, end = start, start + size
    while pos < end:
        if data[pos] == 0:
            pos += 1
            continue
        magic, _, hsize, fsize = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC or pos + hsize + fsize > end:
            raise KitError(f"no fatbin container at byte {pos - start} of .nv_fatbin")
        entries, e = [], pos + hsize
        while e < pos + hsize + fsize:
            kind, _, ehsize, psize = struct.unpack_from("<HHIQ", data, e)
            if ehsize < 32 or e + ehsize + psize > pos + hsize + fsize:
                raise KitError(f"a malformed fatbin entry at byte {e - start} of .nv_fatbin")
            arch, = struct.unpack_from("<I", data, e + 28)
            entries.append((e, ehsize + psize, kind, arch))
            e += ehsize + psize
        yield pos, hsize, entries
        pos += hsize + fsize


def loads_on(kind: int, arch: int, gpu: int) -> bool:
    """Whether a GPU of compute capability `gpu` (90 = 9.0) can load this fatbin entry: SASS
    (kind 2) of its major version up to its own, PTX (kind 1, JIT-compiled) up to its own."""
    return arch <= gpu and (kind == 1 or arch // 10 == gpu // 10)


def slim(data: bytearray, gpu: int) -> dict:
    """Drop, in place, every fatbin entry a `gpu` GPU cannot load (see above); a container left
    with nothing is refused. Returns counts and the sha256 of the kept entries, in order."""
    found = elf_section(data, ".nv_fatbin")
    if found is None:
        return {"kept": 0, "dropped": 0, "kept_sha256": sha256(b"")}
    kept, dropped, h = 0, 0, hashlib.sha256()
    for pos, hsize, entries in list(fatbin_containers(data, *found)):
        keep = [bytes(data[e:e + n]) for e, n, kind, arch in entries if loads_on(kind, arch, gpu)]
        if not keep:
            archs = sorted({arch for _, _, _, arch in entries})
            raise KitError(f"a fatbin holds no code for sm_{gpu} (only {archs}): "
                           "pass --all-archs")
        body = b"".join(keep)
        fsize = struct.unpack_from("<Q", data, pos + 8)[0]
        data[pos + hsize:pos + hsize + fsize] = body + bytes(fsize - len(body))
        struct.pack_into("<Q", data, pos + 8, len(body))
        kept, dropped = kept + len(keep), dropped + len(entries) - len(keep)
        h.update(body)
    return {"kept": kept, "dropped": dropped, "kept_sha256": h.hexdigest()}


def kept_entries_sha256(data, gpu: int) -> str:
    """The sha256 of the entries `slim` would keep, read without changing anything."""
    found, h = elf_section(data, ".nv_fatbin"), hashlib.sha256()
    for _, _, entries in fatbin_containers(data, *found) if found else ():
        for e, n, kind, arch in entries:
            if loads_on(kind, arch, gpu):
                h.update(data[e:e + n])
    return h.hexdigest()


def cuobjdump_cubins(tool: str, lib: Path, gpu: int | None = None) -> collections.Counter:
    """The sha256 of each cubin NVIDIA's cuobjdump extracts from `lib` (those a `gpu` GPU can
    load, when given)."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([str(Path(tool).resolve()), "-xelf", "all", str(lib.resolve())], cwd=tmp,
                       check=True, capture_output=True)
        found = collections.Counter()
        for f in Path(tmp).iterdir():
            m = re.search(r"\.sm_(\d+)[af]?\.cubin$", f.name)  # sm_90a, sm_100f
            if m is None:
                raise KitError(f"cuobjdump extracted {f.name} from {lib.name}: not a cubin name "
                               "this check reads; pass --all-archs")
            if gpu is None or loads_on(2, int(m.group(1)), gpu):
                found[sha256(f)] += 1
        return found


def slim_wheel(whl: Path, gpu: int, out: Path, cuobjdump: str | None = None) -> dict:
    """`whl` with every shared library slimmed to `gpu` (see `slim`) and its RECORD rewritten,
    written to `out` (the same file name). Each library is re-read and its kept entries checked
    against the original's; with `cuobjdump` (the tool's path), the cubins it extracts from the
    slimmed library must be exactly those it extracts from the original for this GPU."""
    report = {"from_sha256": sha256(whl), "libraries": {}}
    records, record = {}, None
    with zipfile.ZipFile(whl) as src, zipfile.ZipFile(out, "w") as dst, \
            tempfile.TemporaryDirectory() as tmp:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                record = (info, data)
                continue
            if re.search(r"\.so(\.|$)", info.filename) and data[:4] == b"\x7fELF":
                buf = bytearray(data)
                r = slim(buf, gpu)
                if r["kept"]:
                    if r["kept_sha256"] != kept_entries_sha256(data, gpu) \
                            or kept_entries_sha256(buf, gpu) != r["kept_sha256"]:
                        raise KitError(f"{info.filename}: the slimmed fatbin does not re-read "
                                       "as the original's kept entries")
                    if cuobjdump:
                        a, b = Path(tmp) / "original.so", Path(tmp) / "slim.so"
                        a.write_bytes(data)
                        b.write_bytes(buf)
                        slimmed = cuobjdump_cubins(cuobjdump, b)
                        r["cuobjdump_cubins"] = sum(slimmed.values())
                        if slimmed != cuobjdump_cubins(cuobjdump, a, gpu):
                            raise KitError(f"{info.filename}: cuobjdump finds other sm_{gpu} "
                                           "cubins in the slimmed library than in the original")
                    report["libraries"][info.filename] = r
                    data = bytes(buf)
                    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest())
                    records[info.filename] = f"sha256={digest.rstrip(b'=').decode()},{len(data)}"
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=6)
        if record is None:
            raise KitError(f"{whl.name} has no RECORD: not a wheel")
        lines = [f"{n},{records[n]}" if (n := line.rsplit(",", 2)[0]) in records else line
                 for line in record[1].decode().splitlines()]
        dst.writestr(record[0], "\n".join(lines) + "\n", compress_type=zipfile.ZIP_DEFLATED)
    if not report["libraries"]:
        raise KitError(f"{whl.name} has no CUDA fatbin to slim: pass --all-archs")
    report["bytes"] = [whl.stat().st_size, out.stat().st_size]
    return report


def find_python(version: str) -> str:
    """An interpreter of `version` (X.Y) that runs: pythonX.Y on PATH (a pyenv shim of a
    version not selected does not), else pyenv's newest X.Y.*."""
    candidates = [shutil.which(f"python{version}")]
    candidates += sorted(map(str, Path.home().glob(f".pyenv/versions/{version}.*/bin/python")),
                         reverse=True)
    for exe in filter(None, candidates):
        p = subprocess.run([exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                           capture_output=True, text=True)
        if p.returncode == 0 and p.stdout.strip() == version:
            return exe
    raise KitError(f"no Python {version} here to build the extension for the host's Python: "
                   f"install one (pyenv install {version}) or pass --no-prebuild")


def imports(python: str) -> str | None:
    """None if Transformer Engine's torch extension imports under `python`, else the error."""
    p = subprocess.run([python, "-c", "import torch, transformer_engine.pytorch"],
                       capture_output=True, text=True)
    return None if p.returncode == 0 else (p.stderr.strip().splitlines() or ["?"])[-1]


def prebuild(sdist: Path, wheels: list[Path], a, dest: Path) -> tuple[Path, dict]:
    """The torch extension compiled here (see the module doc) and imported once; returns the
    wheel and what it was built against."""
    root = Path(a.build_dir).resolve()
    venv = root / f"venv-{a.python}"
    py = venv / "bin" / "python"
    torch_base = a.torch.split("+")[0]
    if not py.exists():
        subprocess.run([find_python(a.python), "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [f"torch=={torch_base}", "setuptools", "wheel", "packaging", "pybind11",
                          "ninja", "nvidia-cudnn-frontend", "einops", "pydantic", "onnx",
                          "onnxscript", "nvdlfw-inspect", "importlib-metadata"], check=True)
    probe = ("import json, importlib.metadata as m, sysconfig, torch; print(json.dumps({"
             "'torch': torch.__version__, 'cuda': torch.version.cuda, "
             "'git': torch.version.git_version, 'site': sysconfig.get_paths()['purelib'], "
             "'toolkit': [r for r in m.requires('torch') if r.startswith('cuda-toolkit')]}))")
    got = json.loads(subprocess.run([str(py), "-c", probe], check=True, capture_output=True,
                                    text=True).stdout)
    if (got["torch"], got["cuda"]) != (a.torch, a.cuda):
        raise KitError(f"PyPI's torch=={torch_base} is {got['torch']} with CUDA {got['cuda']}, "
                       f"not the host's {a.torch} with CUDA {a.cuda}: pass --no-prebuild")
    toolkit = got["toolkit"][0].split(";")[0].split("==")[1].strip() if got["toolkit"] else None
    if toolkit:  # the headers of the CUDA torch was built with
        subprocess.run(pip + [f"cuda-toolkit[nvcc,cccl]=={toolkit}"], check=True)
    out = root / "wheel"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    subprocess.run([str(py), "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "-w", str(out), str(sdist)], check=True,
                   env=build_env(Path(got["site"]), a.arch, os.cpu_count() or 1))
    seconds = time.time() - t0
    (whl,) = out.glob("transformer_engine_torch-*.whl")
    subprocess.run(pip + ["--no-deps", "--force-reinstall", *map(str, wheels), str(whl)],
                   check=True)
    err = imports(str(py))
    if err is not None:
        raise KitError(f"the extension built here does not import: {err}")
    final = dest / whl.name
    shutil.copy2(whl, final)
    return final, {"torch_git": got["git"], "prebuild_s": round(seconds)}


def pack(files: list[Path], dest: Path, built_for: dict, part_bytes: int = PART_BYTES) -> dict:
    """The files as one tar cut into parts (dest/part-NN/kit.tar.NN) and dest/manifest.json,
    written last, in a folder beside `dest` renamed into place: a kit built again replaces the
    old one whole (no part of it left to be carried), and a kill leaves the old or the new."""
    final, dest = dest, dest.with_name(f"{dest.name}.tmp")
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
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
    old = final.with_name(f"{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(dest, final)
    shutil.rmtree(old, ignore_errors=True)
    return manifest


# ---- there: verify, check the machine, install ---------------------------------------------
def read_manifest(mf: Path) -> dict:
    """A kit's manifest.json, or a KitError naming it: damaged (cut, not JSON) or not a kit's."""
    try:
        m = json.loads(mf.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise KitError(f"{mf} is damaged ({type(e).__name__}: {e}): carry the kit's "
                       "manifest.json again (scripts/te_kit.py verify checks it)") from None
    if not isinstance(m, dict) or not isinstance(m.get("parts"), list) or "built_for" not in m:
        raise KitError(f"{mf} is not a kit's manifest (no parts / built_for): carry the one "
                       "`scripts/te_kit.py build` wrote")
    return m


def assemble(kit: Path, out: Path) -> list[Path]:
    """Every part checked (present, its size and sha256), the tar rebuilt and checked as a
    whole, its files extracted into `out` and checked against the manifest."""
    mf = kit / "manifest.json"
    if not mf.is_file():
        raise KitError(f"{mf} is missing: carry the kit's manifest.json with its parts")
    m = read_manifest(mf)
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
            "cuda": torch.version.cuda, "arch": f"{cap[0]}{cap[1]}" if cap else None,
            "torch_git": torch.version.git_version}


TARGET = ("python", "torch", "cuda", "arch")


def target(a, here=None) -> dict:
    """What the kit is built for: --for's JSON, else this machine where it has a CUDA torch and
    a GPU, with --python/--torch/--cuda/--arch over either."""
    if a.host:
        try:
            base = json.loads(Path(a.host).read_text())
        except (OSError, ValueError) as e:
            raise KitError(f"--for {a.host}: not the JSON of `te_kit.py describe` ({e}): run "
                           "`python scripts/te_kit.py describe > host.json` on the GPU host")
        if not isinstance(base, dict):
            raise KitError(f"--for {a.host}: not the JSON object `te_kit.py describe` prints")
    else:
        try:
            base = here or this_machine()
        except ImportError:
            base = {}
        if not base.get("arch"):
            base = {}
    out = {k: getattr(a, k) or base.get(k) for k in TARGET}
    missing = [k for k in TARGET if not out[k]]
    if missing:
        raise KitError(f"which GPU host is the kit for? {', '.join(missing)} unknown: run "
                       "`python scripts/te_kit.py describe > host.json` on that host and build "
                       "with --for host.json (or give --python, --torch, --cuda and --arch)")
    if not str(out["arch"]).isdigit():
        raise KitError(f"--arch {out['arch']}: a GPU architecture as digits, e.g. 90 (H100, "
                       "H200), 100 (B200), 80 (A100)")
    return {k: str(v) for k, v in out.items()}


def check_machine(built_for: dict, here: dict) -> None:
    """The kit's Python, torch, CUDA and GPU architecture against this machine's."""
    diff = {k: (built_for.get(k), here.get(k)) for k in ("python", "torch", "cuda", "arch")
            if built_for.get(k) is not None and str(built_for.get(k)) != str(here.get(k))}
    if diff:
        raise KitError("this machine differs from the one the kit was built for: "
                       + ", ".join(f"{k} {a} (kit) vs {b} (here)" for k, (a, b) in diff.items())
                       + "; rebuild it with scripts/te_kit.py build --python/--torch/--cuda/--arch")


def absent(python: str, modules: dict) -> list:
    """The keys of `modules` (name -> module names) with a module `python` cannot find."""
    if not modules:
        return []
    probe = ("import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] "
             "if importlib.util.find_spec(m) is None))")
    every = sorted({m for ms in modules.values() for m in ms})
    out = subprocess.run([python, "-c", probe, *every], capture_output=True, text=True,
                         check=True).stdout.split()
    return [k for k, ms in modules.items() if set(ms) & set(out)]


def install(kit: Path, jobs: int, python: str = sys.executable) -> str:
    """Install the kit; returns how the torch extension got here (prebuilt, or built here and
    why)."""
    m = read_manifest(kit / "manifest.json") if (kit / "manifest.json").is_file() else None
    with tempfile.TemporaryDirectory() as tmp:
        files = assemble(kit, Path(tmp))  # parts first: a damaged kit is named before anything
        here = this_machine()
        check_machine(m["built_for"], here)
        pip = [python, "-m", "pip", "install", "--no-deps", "--no-index"]
        extras = {f: top_modules(f) for f in files if f.suffix == ".whl" and not is_te(f)}
        missing = absent(python, extras)
        if missing:  # TE's own requirements this machine lacks (EXTRAS); nothing else replaced
            subprocess.run(pip + [str(f) for f in missing], check=True)
        core = [str(f) for f in files if f.suffix == ".whl" and is_te(f)
                and not f.name.startswith("transformer_engine_torch")]
        subprocess.run(pip + core, check=True)
        built = [f for f in files if f.name.startswith("transformer_engine_torch")
                 and f.suffix == ".whl"]
        why = "the kit has no prebuilt extension"
        if built and m["built_for"].get("torch_git") not in (None, here.get("torch_git")):
            why = (f"torch here is commit {here.get('torch_git')}, the extension was built for "
                   f"{m['built_for']['torch_git']}")
        elif built:
            subprocess.run(pip + ["--force-reinstall", str(built[0])], check=True)
            err = imports(python)
            if err is None:
                return "prebuilt" + (f" (with {', '.join(f.name for f in missing)})"
                                     if missing else "")
            if "No module named" in err:  # a build here would not import either
                mod = err.split("No module named")[-1].strip(" '\"")
                raise KitError(f"Transformer Engine imports {mod}, which this machine lacks: "
                               f"build the kit with --with {mod.split('.')[0]}, or carry its "
                               f"wheel in WHEELS ({err})")
            why = f"the prebuilt extension does not import here ({err})"
        print(f"te_kit: building the torch extension here: {why}", file=sys.stderr)
        import sysconfig

        sdist = next(f for f in files if f.name.endswith(".tar.gz"))
        subprocess.run(pip + ["--no-build-isolation", "--force-reinstall", str(sdist)],
                       check=True, env=build_env(Path(sysconfig.get_paths()["purelib"]),
                                                 m["built_for"]["arch"], jobs))
        err = imports(python)
        if err is not None:
            raise KitError(f"Transformer Engine does not import after the build: {err}")
        return f"built here ({why})"


KERNELS = """
import json, torch, torch.nn.functional as F, transformer_engine.pytorch as te
from transformer_engine.common.recipe import Float8CurrentScaling
torch.manual_seed(0)
err = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
x = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
lin = te.Linear(1024, 2048, bias=False, params_dtype=torch.bfloat16, device="cuda")
ref = x.float() @ lin.weight.float().t()
out = {"linear_bf16": err(lin(x), ref)}
with te.autocast(enabled=True, recipe=Float8CurrentScaling()):
    y = lin(x)
y.float().square().mean().backward()
out["linear_fp8"] = err(y, ref)
out["linear_fp8_grad"] = err(x.grad, (2 * y.float() / y.numel()) @ lin.weight.float())
norm = te.RMSNorm(1024, eps=1e-5, params_dtype=torch.bfloat16, device="cuda")
out["rmsnorm"] = err(norm(x), F.rms_norm(x.float(), (1024,), eps=1e-5))
q, k, v = (torch.randn(256, 2, 8, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
attn = te.DotProductAttention(8, 64, attn_mask_type="causal", qkv_format="sbhd")
ref = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3).float() for t in (q, k, v)),
                                     is_causal=True).permute(2, 0, 1, 3).reshape(256, 2, 512)
out["attention"] = err(attn(q, k, v), ref)
torch.cuda.synchronize()
print(json.dumps({k: round(v, 5) for k, v in out.items()}))
"""
KERNEL_TOLERANCE = {"linear_bf16": 1e-2, "linear_fp8": 0.1, "linear_fp8_grad": 0.1,
                    "rmsnorm": 1e-2, "attention": 2e-2}


def kernels(python: str = sys.executable) -> dict:
    """Run Transformer Engine's kernels once on this GPU (a linear layer in bf16 and in fp8 with
    its backward, RMSNorm, causal attention) against torch's results in fp32: the check that the
    core library holds code this GPU runs ("no kernel image is available" otherwise)."""
    p = subprocess.run([python, "-c", KERNELS], capture_output=True, text=True)
    if p.returncode != 0:
        raise KitError("Transformer Engine's kernels do not run here: "
                       + (p.stderr.strip().splitlines() or ["?"])[-1])
    got = json.loads(p.stdout.strip().splitlines()[-1])
    bad = {k: v for k, v in got.items() if not v <= KERNEL_TOLERANCE[k]}
    if bad:
        raise KitError(f"Transformer Engine's kernels run but disagree with torch: {bad} "
                       f"(relative errors; allowed {KERNEL_TOLERANCE})")
    return got


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--dest", default=".te-kit")
    b.add_argument("--te", default="2.20.2")
    b.add_argument("--for", dest="host", help="the host's `describe` JSON")
    b.add_argument("--python", help="the host's Python, X.Y")
    b.add_argument("--torch", help="the host's torch version, e.g. 2.13.0 or 2.11.0+cu130")
    b.add_argument("--cuda", help="the host torch's CUDA version, e.g. 13.0")
    b.add_argument("--arch", help="the host GPU's architecture, e.g. 90")
    b.add_argument("--with", dest="extras", type=lambda v: [x for x in v.split(",") if x],
                   default=EXTRAS, help="the wheels TE imports that the host may lack, comma "
                   f"separated, pinned in requirements.lock (default {','.join(EXTRAS)})")
    b.add_argument("--all-archs", action="store_true",
                   help="keep the core library's code for every GPU (276 MB instead of ~32 MB; "
                        "a kit for a GPU of another architecture than --arch)")
    b.add_argument("--no-prebuild", dest="prebuild", action="store_false",
                   help="carry the sdist only: the host compiles the extension")
    b.add_argument("--build-dir", default=".te-kit-build",
                   help="the build venv (~5.5 GB of wheels, kept for the next build)")
    sub.add_parser("kernels", help="run TE's kernels once on this GPU against torch")
    sub.add_parser("describe", help="this host's Python, torch, CUDA and GPU (JSON for --for)")
    for name in ("verify", "install"):
        s = sub.add_parser(name)
        s.add_argument("--kit", default=".te-kit")
        s.add_argument("--jobs", type=int, default=os.cpu_count())
    a = ap.parse_args(argv)
    try:
        if a.cmd == "describe":
            print(json.dumps(this_machine(), indent=1))
        elif a.cmd == "build":
            built_for = {**target(a), "te": a.te}
            for k in TARGET:
                setattr(a, k, built_for[k])
            with tempfile.TemporaryDirectory() as tmp:
                files = download(a.te, a.python, Path(tmp), a.extras)
                if not a.all_archs:  # the core library with the host's GPU code only
                    (core,) = [f for f in files if f.name.startswith("transformer_engine_cu")]
                    (Path(tmp) / "slim").mkdir()
                    slimmed = Path(tmp) / "slim" / core.name
                    built_for["slim"] = slim_wheel(core, int(a.arch), slimmed,
                                                   fetch_cuobjdump(Path(a.build_dir).resolve()))
                    files[files.index(core)] = slimmed
                if a.prebuild:
                    sdist = next(f for f in files if f.name.endswith(".tar.gz"))
                    whl, info = prebuild(sdist, [f for f in files if f.suffix == ".whl"], a,
                                         Path(tmp))
                    files.append(whl)
                    built_for.update(info)
                m = pack(files, Path(a.dest), built_for)
            print(f"te_kit: {len(m['parts'])} parts, {m['tar']['bytes'] / 2**20:.1f} MiB in "
                  f"{a.dest}: carry each part-NN/ and manifest.json")
        elif a.cmd == "verify":
            with tempfile.TemporaryDirectory() as tmp:
                print(f"te_kit: {len(assemble(Path(a.kit), Path(tmp)))} files verified")
        elif a.cmd == "kernels":
            print(f"te_kit: Transformer Engine's kernels run here, relative errors "
                  f"{json.dumps(kernels())}")
        else:
            how = install(Path(a.kit), a.jobs)
            print(f"te_kit: Transformer Engine installed, its torch extension {how}")
    except KitError as e:
        print(f"te_kit: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:  # pip, the compile, cuobjdump: their own output
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
        print(f"te_kit: {' '.join(map(str, e.cmd))[:300]} failed (exit {e.returncode})"
              + (f": {err.strip()[-500:]}" if err else ""), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
