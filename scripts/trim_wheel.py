"""Drop files from a wheel, in place, and rewrite its RECORD to match.

    python scripts/trim_wheel.py WHEEL --drop GLOB... [--keep GLOB...]

A file goes when its path matches a --drop glob and no --keep glob. scripts/gpu_wheels.sh trims
PuLP (which ModelOpt's searcher imports) to the CBC solver of Linux x86-64: its wheel carries six
platforms' solvers, 16.4 of its 16.4 MB, and the GPU host's transfer holds 64 MiB.
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import sys
import zipfile
from pathlib import Path


def trim(whl: Path, drop: list[str], keep: list[str] = ()) -> list[str]:
    """Rewrite `whl` without the matching files (RECORD lines included); returns their paths.
    Written beside it and renamed over it: a kill leaves the old wheel or the new one."""
    def goes(name: str) -> bool:
        return (any(fnmatch.fnmatch(name, g) for g in drop)
                and not any(fnmatch.fnmatch(name, g) for g in keep))

    tmp = whl.with_name(f".{whl.name}.tmp")
    with zipfile.ZipFile(whl) as src:
        names = [i.filename for i in src.infolist()]
        if not any(n.endswith(".dist-info/RECORD") for n in names):
            raise SystemExit(f"trim_wheel: {whl} has no RECORD: not a wheel")
        gone = [n for n in names if goes(n)]
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                if info.filename in gone:
                    continue
                data = src.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    lines = [x for x in data.decode().splitlines()
                             if x.rsplit(",", 2)[0] not in gone]
                    data = ("\n".join(lines) + "\n").encode()
                dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    os.replace(tmp, whl)
    return gone


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("wheel", type=Path)
    ap.add_argument("--drop", nargs="+", required=True)
    ap.add_argument("--keep", nargs="*", default=[])
    a = ap.parse_args(argv)
    before = a.wheel.stat().st_size
    gone = trim(a.wheel, a.drop, a.keep)
    print(f"trim_wheel: {a.wheel.name}: {len(gone)} files dropped, "
          f"{before / 1e6:.1f} -> {a.wheel.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
