"""Every command in the README and docs/ runs as written: each shell block is run with `make`,
`python`, `torchrun`, `docker` and `enroot` recording their arguments instead of acting, then
every `make` target exists, every recipe file exists, and every override names a real section
and key of that recipe (config.load's own checks), so a renamed key breaks this test, not a
user's day."""
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from recipes.lib import config

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
STUBS = "".join(f'{name}() {{ python3 -c \'import json,sys; print(json.dumps(sys.argv[1:]))\' '
                f'{name} "$@" >> "$LOG"; }}\n'
                for name in ("make", "python", "torchrun", "docker", "enroot"))


def shell_blocks(page: Path) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", page.read_text(), re.M | re.S)


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][a-z_-]*):", text, re.M))


def check_config(recipe: str, args: list[str], where: str) -> None:
    assert (ROOT / recipe).is_file(), f"{where}: no recipe {recipe}"
    overrides = [a for a in args if "=" in a and "." in a.split("=", 1)[0]]
    try:
        config.load(str(ROOT / recipe), overrides)  # unknown sections and keys raise
    except config.ConfigError as e:
        pytest.fail(f"{where}: {e}")


def calls(block: str, tmp_path: Path) -> list[list[str]]:
    log = tmp_path / "calls.jsonl"
    log.unlink(missing_ok=True)
    script = STUBS + block.replace(".venv/bin/python", "python")
    subprocess.run(["bash", "-c", script], cwd=ROOT, check=True, env={"LOG": str(log),
                   "PATH": "/usr/bin:/bin"})
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_documented_command_runs_as_written(page, tmp_path):
    targets = make_targets()
    for block in shell_blocks(page):
        for argv in calls(block, tmp_path):
            where = f"{page.name}: {shlex.join(argv)}"
            if argv[0] == "make":
                goals = [a for a in argv[1:] if "=" not in a]
                assert goals and set(goals) <= targets, f"{where}: no such make target"
                kv = dict(a.split("=", 1) for a in argv[1:] if "=" in a)
                if goals[0] not in ("demo", "demo-compare", "demo-search", "test", "test-fast",
                                    "setup", "assets", "clean", "help", "bench", "bench-demo",
                                    "docker-build", "gpu-check", "gpu-wheels", "bridge-env"):
                    check_config(kv.get("RECIPE", "conf/tiny.yaml"),
                                 shlex.split(kv.get("ARGS", "")), where)
            elif argv[0] in ("python", "torchrun") and "-m" in argv:
                module = argv[argv.index("-m") + 1]
                assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), where
                if "--config" in argv:
                    check_config(argv[argv.index("--config") + 1], argv, where)
