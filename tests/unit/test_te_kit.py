"""scripts/te_kit.py: the offline Transformer Engine kit is cut into parts that fit a transfer,
reassembled bit for bit, and refused naming a missing or damaged part, or a machine that differs
from the one it was built for, before anything is installed."""
import base64
import hashlib
import importlib.util
import json
import os
import struct
import subprocess
import sys
import types
import zipfile

import pytest

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("te_kit", ROOT / "scripts" / "te_kit.py")
te_kit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(te_kit)
BUILT_FOR = {"python": "3.12", "torch": "2.11.0+cu130", "cuda": "13.0", "arch": "90",
             "te": "2.20.2"}


@pytest.fixture
def kit(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    files = []
    for name, n in (("transformer_engine_cu13-2.20.2-py3-none-manylinux_2_28_x86_64.whl", 7000),
                    ("transformer_engine-2.20.2-py3-none-any.whl", 900),
                    ("transformer_engine_torch-2.20.2.tar.gz", 300)):
        (src / name).write_bytes(os.urandom(n))
        files.append(src / name)
    m = te_kit.pack(files, tmp_path / "kit", BUILT_FOR, part_bytes=2048)
    return tmp_path / "kit", files, m


def test_parts_fit_and_reassemble_bit_for_bit(kit, tmp_path):
    folder, files, m = kit
    assert len(m["parts"]) >= 4 and all(p["bytes"] <= 2048 for p in m["parts"])
    assert all((folder / p["path"]).parent.name.startswith("part-") for p in m["parts"])
    out = te_kit.assemble(folder, tmp_path / "out")
    assert [f.read_bytes() for f in out] == [f.read_bytes() for f in files]
    assert json.loads((folder / "manifest.json").read_text())["built_for"] == BUILT_FOR
    assert te_kit.main(["verify", "--kit", str(folder)]) == 0
    assert te_kit.PART_BYTES <= 55 << 20  # one part per 64 MiB transfer, with the tree
    m = te_kit.pack(files, folder, BUILT_FOR)  # built again: the old kit's parts are gone
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "part-00"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kit", "out", "src"]
    assert [f.read_bytes() for f in te_kit.assemble(folder, tmp_path / "again")] \
        == [f.read_bytes() for f in files]


def test_a_missing_or_damaged_part_is_named(kit, tmp_path):
    folder, _, m = kit
    victim = folder / m["parts"][1]["path"]
    data = victim.read_bytes()
    victim.write_bytes(data[:10] + bytes([data[10] ^ 1]) + data[11:])
    with pytest.raises(te_kit.KitError, match=r"part part-01/kit.tar.01 is damaged"):
        te_kit.assemble(folder, tmp_path / "a")
    victim.unlink()
    with pytest.raises(te_kit.KitError, match=r"part part-01/kit.tar.01 is missing: carry "
                                              r"part-01/ too"):
        te_kit.assemble(folder, tmp_path / "b")
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "te_kit.py"), "install", "--kit",
                        str(folder)], capture_output=True, text=True)
    assert p.returncode == 2 and "part-01/kit.tar.01 is missing" in p.stderr
    assert "Traceback" not in p.stderr


def test_a_machine_that_differs_is_refused():
    te_kit.check_machine(BUILT_FOR, {"python": "3.12", "torch": "2.11.0+cu130", "cuda": "13.0",
                                     "arch": "90"})
    with pytest.raises(te_kit.KitError, match=r"torch 2.11.0\+cu130 \(kit\) vs 2.13.0 \(here\), "
                                              r"arch 90 \(kit\) vs None \(here\)"):
        te_kit.check_machine(BUILT_FOR, {"python": "3.12", "torch": "2.13.0", "cuda": "13.0",
                                         "arch": None})


def fake_python(tmp_path, imports_ok_after: int):
    """A `python` that logs each call and fails the import check until the given call; it
    finds every module but those in $ABSENT."""
    log, count = tmp_path / "calls.log", tmp_path / "imports"
    exe = tmp_path / "python"
    exe.write_text(f"""#!/bin/bash
echo "$* NVTE_PYTORCH_FORCE_BUILD=$NVTE_PYTORCH_FORCE_BUILD" >> {log}
if [ "$1" = -c ] && [[ "$2" == *find_spec* ]]; then echo "$ABSENT"; exit 0; fi
if [ "$1" = -c ]; then
  echo x >> {count}; [ "$(wc -l < {count})" -ge {imports_ok_after} ] && exit 0
  echo "${{IMPORT_ERROR:-ImportError: undefined symbol: _ZN3c10}}" >&2; exit 1
fi
""")
    exe.chmod(0o755)
    return str(exe), log


@pytest.mark.parametrize("case", ["prebuilt", "other torch", "does not import"])
def test_install_takes_the_prebuilt_extension_or_builds_it_and_says_why(tmp_path, monkeypatch,
                                                                        case):
    src = tmp_path / "src"
    src.mkdir()
    names = ["transformer_engine_cu13-2.20.2-py3-none-manylinux_2_28_x86_64.whl",
             "transformer_engine-2.20.2-py3-none-any.whl", "transformer_engine_torch-2.20.2.tar.gz",
             "transformer_engine_torch-2.20.2-cp312-cp312-linux_x86_64.whl"]
    for n in names:
        (src / n).write_bytes(os.urandom(100))
    built_for = {**BUILT_FOR, "torch_git": "abc123"}
    te_kit.pack([src / n for n in names], tmp_path / "kit", built_for, part_bytes=150)
    here = {"python": "3.12", "torch": "2.11.0+cu130", "cuda": "13.0", "arch": "90",
            "torch_git": "def456" if case == "other torch" else "abc123"}
    monkeypatch.setattr(te_kit, "this_machine", lambda: here)
    python, log = fake_python(tmp_path, 2 if case == "does not import" else 1)
    how = te_kit.install(tmp_path / "kit", jobs=3, python=python)
    calls = log.read_text().splitlines()
    sdist_built = any(".tar.gz" in c and "NVTE_PYTORCH_FORCE_BUILD=TRUE" in c for c in calls)
    if case == "prebuilt":
        assert how == "prebuilt" and not sdist_built
        assert any("cp312-cp312-linux_x86_64.whl" in c for c in calls)
    elif case == "other torch":
        assert how == "built here (torch here is commit def456, the extension was built for " \
                      "abc123)" and sdist_built
        assert not any("cp312-cp312-linux_x86_64.whl" in c for c in calls)
    else:
        assert how.startswith("built here (the prebuilt extension does not import here "
                              "(ImportError: undefined symbol") and sdist_built


def test_the_build_finds_a_working_python_and_the_headers_the_compile_needs(tmp_path,
                                                                          monkeypatch):
    """A pyenv shim of a version not selected (exit 127) is passed over for pyenv's own
    interpreter; the build environment never tries GitHub and puts CCCL (nv/target) on the C++
    include path."""
    shim_dir = tmp_path / "shims"
    shim_dir.mkdir()
    (shim_dir / "python3.12").write_text("#!/bin/sh\nexit 127\n")
    real = tmp_path / "home" / ".pyenv" / "versions" / "3.12.4" / "bin" / "python"
    real.parent.mkdir(parents=True)
    real.write_text("#!/bin/sh\necho 3.12\n")
    for f in (shim_dir / "python3.12", real):
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim_dir}:/usr/bin:/bin")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert te_kit.find_python("3.12") == str(real)
    with pytest.raises(te_kit.KitError, match="no Python 3.9 here"):
        te_kit.find_python("3.9")
    cccl = tmp_path / "site" / "nvidia" / "cu13" / "include" / "cccl"
    cccl.mkdir(parents=True)
    env = te_kit.build_env(tmp_path / "site", "90", 7)
    assert env["NVTE_PYTORCH_FORCE_BUILD"] == "TRUE" and env["NVTE_BUILD_USE_NVIDIA_WHEELS"] == "1"
    assert env["NVTE_CUDA_ARCHS"] == "90" and env["MAX_JOBS"] == "7"
    assert str(cccl) in env["CPLUS_INCLUDE_PATH"].split(os.pathsep)


# ---- the core library slimmed to the host's GPU ---------------------------------------------
def entry(kind: int, arch: int, payload: bytes) -> bytes:
    """A fatbin entry: a 64-byte header (kind, header size, payload size, architecture at byte
    28) and its payload."""
    head = struct.pack("<HHIQIIHHI", kind, 0x101, 64, len(payload), 0, 0, 0, 0, arch)
    return head + bytes(64 - len(head)) + payload


def container(*entries: bytes) -> bytes:
    body = b"".join(entries)
    return struct.pack("<IHHQ", te_kit.FATBIN_MAGIC, 1, 16, len(body)) + body


def elf_with(fatbin: bytes) -> bytes:
    """A minimal little-endian ELF64 file: code before and after a .nv_fatbin section."""
    code, names = b"\x90" * 40, b"\0.nv_fatbin\0.shstrtab\0"
    fat_at = 64 + len(code)
    names_at = fat_at + len(fatbin) + len(code)
    shoff = names_at + len(names)
    head = (b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
            + struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2))

    def section(name, offset, size):
        return struct.pack("<IIQQQQIIQQ", name, 1, 0, 0, offset, size, 0, 0, 1, 0)
    return (head + code + fatbin + code + names + bytes(64) + section(1, fat_at, len(fatbin))
            + section(11, names_at, len(names)))


def read_back(data: bytes) -> list[list[tuple[int, int, bytes]]]:
    at, size = te_kit.elf_section(data, ".nv_fatbin")
    return [[(kind, arch, data[e:e + n]) for e, n, kind, arch in entries]
            for _, _, entries in te_kit.fatbin_containers(data, at, size)]


SASS, PTX = 2, 1
FAT = [[entry(SASS, 75, os.urandom(50)), entry(SASS, 80, os.urandom(70)),
        entry(SASS, 90, os.urandom(90)), entry(SASS, 100, os.urandom(110)),
        entry(PTX, 80, os.urandom(30)), entry(PTX, 120, os.urandom(20))],
       [entry(SASS, 89, os.urandom(60)), entry(SASS, 90, os.urandom(40))]]


@pytest.mark.parametrize("gpu, kept", [(90, [[2, 4], [1]]), (89, [[1, 4], [0]])])
def test_slim_keeps_exactly_the_code_the_gpu_can_load(gpu, kept):
    """SASS of the GPU's major version up to its own and PTX up to its own stay, byte for byte,
    each in its container at the same place; the rest of the file does not move."""
    fatbin = container(*FAT[0]) + bytes(8) + container(*FAT[1])  # zeros between: alignment
    data = elf_with(fatbin)
    slimmed = bytearray(data)
    report = te_kit.slim(slimmed, gpu)
    assert len(slimmed) == len(data)
    at, size = te_kit.elf_section(data, ".nv_fatbin")
    assert slimmed[:at] == data[:at] and slimmed[at + size:] == data[at + size:]
    want = [[FAT[c][i] for i in keep] for c, keep in enumerate(kept)]
    assert [[e for _, _, e in c] for c in read_back(bytes(slimmed))] == want
    assert report["kept"] == 3 and report["dropped"] == 5
    assert report["kept_sha256"] == te_kit.kept_entries_sha256(data, gpu) \
        == te_kit.kept_entries_sha256(slimmed, gpu)
    assert slimmed.index(container(*want[1])) > slimmed.index(container(*want[0]))


def test_slim_refuses_a_fatbin_without_code_for_the_gpu():
    data = bytearray(elf_with(container(entry(SASS, 80, b"x" * 8), entry(SASS, 89, b"y" * 8))))
    with pytest.raises(te_kit.KitError, match=r"holds no code for sm_90 \(only \[80, 89\]\): "
                                              r"pass --all-archs"):
        te_kit.slim(data, 90)
    with pytest.raises(te_kit.KitError, match="no fatbin container at byte 0"):
        te_kit.slim(bytearray(elf_with(b"\x01" * 32)), 90)
    with pytest.raises(te_kit.KitError, match="a malformed fatbin entry at byte 16"):
        te_kit.slim(bytearray(elf_with(container(bytes(64)))), 90)  # would loop for ever


def test_the_slimmed_wheel_records_its_new_library(tmp_path):
    """Every other file of the wheel is copied as it was; RECORD carries the slimmed library's
    sha256 and size (what pip writes into the installed package's record)."""
    lib = elf_with(container(*FAT[0]) + container(*FAT[1]))
    files = {"pkg/__init__.py": b"x = 1\n", "pkg/wheel_lib/libcore.so": lib}

    def record_line(name, data):
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        return f"{name},sha256={digest},{len(data)}"
    whl = tmp_path / "pkg-1.0-py3-none-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for name, data in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o755 << 16
            z.writestr(info, data)
        z.writestr("pkg-1.0.dist-info/RECORD", "\n".join(
            [record_line(n, d) for n, d in files.items()] + ["pkg-1.0.dist-info/RECORD,,"]))
    out = tmp_path / "slim.whl"
    report = te_kit.slim_wheel(whl, 90, out)
    assert report["libraries"]["pkg/wheel_lib/libcore.so"]["dropped"] == 5
    with zipfile.ZipFile(out) as z:
        new_lib = z.read("pkg/wheel_lib/libcore.so")
        record = z.read("pkg-1.0.dist-info/RECORD").decode().splitlines()
        assert z.read("pkg/__init__.py") == files["pkg/__init__.py"]
        assert z.getinfo("pkg/wheel_lib/libcore.so").external_attr == 0o755 << 16
    assert len(new_lib) == len(lib) and new_lib != lib
    assert record == [record_line("pkg/__init__.py", files["pkg/__init__.py"]),
                      record_line("pkg/wheel_lib/libcore.so", new_lib),
                      "pkg-1.0.dist-info/RECORD,,"]
    with zipfile.ZipFile(whl, "w") as z:  # nothing to slim: the kit would carry all of it
        z.writestr("pkg/__init__.py", "x = 1\n")
        z.writestr("pkg-1.0.dist-info/RECORD", "")
    with pytest.raises(te_kit.KitError, match="no CUDA fatbin to slim: pass --all-archs"):
        te_kit.slim_wheel(whl, 90, out)


def test_a_failed_tool_is_named_not_a_traceback(tmp_path, monkeypatch, capsys):
    """pip, the compile or cuobjdump failing during a build: the command and its error."""
    def download(*a):
        raise subprocess.CalledProcessError(1, ["pip", "download", "transformer-engine-cu13"],
                                            stderr=b"ERROR: No matching distribution found")
    monkeypatch.setattr(te_kit, "download", download)
    assert te_kit.main(["build", "--dest", str(tmp_path / "kit"), "--no-prebuild", "--python",
                        "3.12", "--torch", "2.13.0+cu130", "--cuda", "13.0", "--arch", "90"]) == 2
    err = capsys.readouterr().err
    assert err == ("te_kit: pip download transformer-engine-cu13 failed (exit 1): ERROR: No "
                   "matching distribution found\n")
    assert not (tmp_path / "kit").exists()


def a_wheel(folder, name: str, files: dict):
    whl = folder / name
    with zipfile.ZipFile(whl, "w") as z:
        for n, text in files.items():
            z.writestr(n, text)
    return whl


@pytest.mark.parametrize("absent", ["", "pydantic_core"])
def test_install_adds_only_the_requirements_this_machine_lacks(tmp_path, monkeypatch, absent):
    """The kit's extra wheels (pydantic for TE's recipes: the lent H200's image has none) are
    installed only where their module is missing; the machine's own packages stay."""
    src = tmp_path / "src"
    src.mkdir()
    te = ["transformer_engine_cu13-2.20.2-py3-none-manylinux_2_28_x86_64.whl",
          "transformer_engine_torch-2.20.2-cp312-cp312-linux_x86_64.whl"]
    files = [a_wheel(src, n, {"transformer_engine/x.py": ""}) for n in te]
    files += [a_wheel(src, "pydantic_core-2.50.5-cp312-cp312-manylinux_2_17_x86_64.whl",
                      {"pydantic_core/__init__.py": "", "pydantic_core/_core.so": "",
                       "pydantic_core-2.50.5.dist-info/RECORD": ""}),
              a_wheel(src, "pydantic-2.14.4-py3-none-any.whl", {"pydantic/__init__.py": ""})]
    assert te_kit.top_modules(files[2]) == ["pydantic_core"]
    te_kit.pack(files, tmp_path / "kit", {**BUILT_FOR, "torch_git": "abc"})
    monkeypatch.setattr(te_kit, "this_machine", lambda: {**BUILT_FOR, "torch_git": "abc"})
    monkeypatch.setenv("ABSENT", absent)
    python, log = fake_python(tmp_path, 1)
    how = te_kit.install(tmp_path / "kit", jobs=1, python=python)
    installs = [c for c in log.read_text().splitlines() if c.startswith("-m pip install")]
    if absent:
        assert how == "prebuilt (with pydantic_core-2.50.5-cp312-cp312-manylinux_2_17_x86_64.whl)"
        assert "pydantic_core-2.50.5" in installs[0] and "pydantic-2.14.4" not in installs[0]
    else:
        assert how == "prebuilt"
        assert not any("pydantic" in c for c in installs)


def test_a_module_te_needs_and_the_machine_lacks_is_named_not_built(tmp_path, monkeypatch):
    """A missing pure-Python requirement would fail a build on the host too: named with the
    fix, nothing compiled."""
    src = tmp_path / "src"
    src.mkdir()
    names = ["transformer_engine_cu13-2.20.2-py3-none-manylinux_2_28_x86_64.whl",
             "transformer_engine_torch-2.20.2.tar.gz",
             "transformer_engine_torch-2.20.2-cp312-cp312-linux_x86_64.whl"]
    for n in names:
        (src / n).write_bytes(os.urandom(100))
    te_kit.pack([src / n for n in names], tmp_path / "kit", {**BUILT_FOR, "torch_git": "abc"})
    monkeypatch.setattr(te_kit, "this_machine", lambda: {**BUILT_FOR, "torch_git": "abc"})
    monkeypatch.setenv("IMPORT_ERROR", "ModuleNotFoundError: No module named 'nvdlfw_inspect.api'")
    python, log = fake_python(tmp_path, 99)
    with pytest.raises(te_kit.KitError, match=r"imports nvdlfw_inspect.api, which this machine "
                                              r"lacks: build the kit with --with nvdlfw_inspect"):
        te_kit.install(tmp_path / "kit", jobs=1, python=python)
    assert not any(".tar.gz" in c for c in log.read_text().splitlines())


def test_the_extra_wheels_are_the_pinned_versions():
    """What the kit carries beside TE is the version the rest of the stack is pinned to."""
    lock = (ROOT / "requirements.lock").read_text().splitlines()
    for name in te_kit.EXTRAS:
        assert te_kit.pinned(name) in lock
    assert te_kit.pinned("pydantic-core") == te_kit.pinned("pydantic_core")
    with pytest.raises(te_kit.KitError, match="no-such-thing is not pinned in requirements.lock"):
        te_kit.pinned("no-such-thing")


def test_the_kit_is_built_for_the_host_it_names_not_a_fixed_one(tmp_path, monkeypatch, capsys):
    """`describe` on the GPU host, `build --for` its JSON here; flags override single values; a
    build that cannot tell which host it is for (no --for, no GPU here) refuses in one line."""
    host = {"python": "3.12", "torch": "2.13.0+cu130", "cuda": "13.0", "arch": "100",
            "torch_git": "abc"}
    monkeypatch.setattr(te_kit, "this_machine", lambda: dict(host))
    assert te_kit.main(["describe"]) == 0
    described = tmp_path / "host.json"
    described.write_text(capsys.readouterr().out)
    got = {}

    def download(te, python, dest, extras):
        got["python"] = python
        raise te_kit.KitError("stop here")
    monkeypatch.setattr(te_kit, "download", download)
    build = ["build", "--dest", str(tmp_path / "kit"), "--no-prebuild"]
    monkeypatch.setattr(te_kit, "this_machine", lambda: {"python": "3.11", "torch": "2.13.0",
                                                         "cuda": None, "arch": None})
    assert te_kit.main(build) == 2  # a CPU machine, no --for: which host?
    assert "which GPU host is the kit for? python, torch, cuda, arch unknown: run `python " \
        "scripts/te_kit.py describe > host.json`" in capsys.readouterr().err
    a = types.SimpleNamespace(host=str(described), python=None, torch=None, cuda=None,
                              arch="90")
    assert te_kit.target(a) == {"python": "3.12", "torch": "2.13.0+cu130", "cuda": "13.0",
                                "arch": "90"}
    assert te_kit.main([*build, "--for", str(described)]) == 2 and got["python"] == "3.12"
    assert capsys.readouterr().err == "te_kit: stop here\n"
    described.write_text("[1, 2]")
    assert te_kit.main([*build, "--for", str(described)]) == 2
    assert "not the JSON object `te_kit.py describe` prints" in capsys.readouterr().err
    # on the GPU host itself, nothing to name
    monkeypatch.setattr(te_kit, "this_machine", lambda: dict(host))
    assert te_kit.main(build) == 2 and "stop here" in capsys.readouterr().err


@pytest.mark.parametrize("damage, message", [
    (lambda t: t[:len(t) // 2], "manifest.json is damaged (JSONDecodeError"),
    (lambda t: "[]", "is not a kit's manifest (no parts / built_for)"),
    (lambda t: "\udcff", "manifest.json is damaged"),
])
def test_a_damaged_manifest_is_one_line_not_a_traceback(kit, capsys, damage, message):
    folder, _, _ = kit
    mf = folder / "manifest.json"
    text = damage(mf.read_text())
    mf.write_bytes(text.encode("utf-8", "surrogateescape"))
    for cmd in ("verify", "install"):
        assert te_kit.main([cmd, "--kit", str(folder)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("te_kit: ") and message in err and err.count("\n") == 1, err


def test_the_demo_assets_script_names_a_damaged_record_in_one_line(tmp_path):
    """scripts/ follow the stages' rule: bad input is one line and exit 2, not a traceback."""
    dest = tmp_path / "demo"
    (dest / "smollm2-135m-instruct").mkdir(parents=True)
    (dest / "smollm2-135m-instruct" / "config.json").write_text("{}")
    (dest / "ASSETS.json").write_text('{"model": ')  # cut while written
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_demo_assets.py"),
                        "--dest", str(dest)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith(f"prepare_demo_assets: {dest / 'ASSETS.json'} is missing or "
                               "damaged (JSONDecodeError") and p.stderr.count("\n") == 1
