"""The code's shape, checked as behaviour a newcomer relies on: stages import only recipes/lib,
lib has no import cycles, an import inside a function says why it is there, and no module or
function outgrows a read (450 and 80 lines). Loading one stage's config imports no plotting,
megatron or ModelOpt."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
STAGES = {p.stem for p in RECIPES.glob("*.py") if p.stem != "__init__"}
MODULES = sorted(p for p in RECIPES.rglob("*.py"))


def imports(path: Path, top_only: bool):
    """(line, imported recipes module) of each import statement, module level or all."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_only else list(ast.walk(tree))
    for n in nodes:
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("recipes"):
            names = [n.module] + [f"{n.module}.{a.name}" for a in n.names]
            yield n.lineno, names
        elif isinstance(n, ast.Import):
            yield n.lineno, [a.name for a in n.names if a.name.startswith("recipes")]


def test_stages_import_only_lib():
    for stage in STAGES:
        for line, names in imports(RECIPES / f"{stage}.py", top_only=False):
            other = {x.split(".")[1] for x in names if x.count(".") >= 1} & (STAGES - {stage})
            assert not other, f"recipes/{stage}.py:{line} imports the stage(s) {other}: shared " \
                              "logic belongs in recipes/lib/"
    for path in (RECIPES / "lib").glob("*.py"):
        for line, names in imports(path, top_only=False):
            stages = {x.split(".")[1] for x in names} & STAGES
            assert not stages, f"{path}:{line} (lib) imports the stage(s) {stages}"


def lib_graph() -> dict[str, set[str]]:
    lib = {p.stem for p in (RECIPES / "lib").glob("*.py") if p.stem != "__init__"}
    graph = {}
    for m in lib:
        deps = set()
        for _, names in imports(RECIPES / "lib" / f"{m}.py", top_only=True):
            deps |= {x.split(".")[2] for x in names if x.startswith("recipes.lib.")} & lib
        graph[m] = deps - {m}
    return graph


def test_lib_has_no_import_cycles():
    graph, state = lib_graph(), {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import cycle: " + " -> ".join(path + [m])
        state[m] = "open"
        for d in sorted(graph[m]):
            visit(d, path + [m])
        state[m] = "done"

    for m in sorted(graph):
        visit(m, [])


def test_an_import_inside_a_function_says_why():
    """Top-of-file imports, except where a comment says why one is deferred (megatron before
    compat.apply(), a heavy module a light one rarely needs): on the import's own lines, or on
    the line above the run of imports it belongs to."""
    bad = []
    for path in MODULES:
        lines = path.read_text().splitlines()
        for fn in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for body in [fn.body] + [getattr(n, f) for n in ast.walk(fn) if n is not fn
                                     for f in ("body", "orelse", "finalbody", "handlers")
                                     if isinstance(getattr(n, f, None), list)]:
                run_head = None
                for stmt in body:
                    if not isinstance(stmt, (ast.Import, ast.ImportFrom)):
                        run_head = None
                        continue
                    if run_head is None:  # the first import of a run: the comment above it
                        j = stmt.lineno - 2
                        while j >= 0 and not lines[j].strip():
                            j -= 1
                        run_head = j >= 0 and lines[j].strip().startswith("#")
                    own = any("#" in lines[k] for k in range(stmt.lineno - 1, stmt.end_lineno))
                    if not (own or run_head):
                        bad.append(f"{path.relative_to(ROOT)}:{stmt.lineno}")
    assert not bad, f"imports inside functions without a comment saying why: {bad}"


def test_modules_and_functions_stay_readable():
    long = []
    for path in MODULES:
        src = path.read_text()
        if src.count("\n") > 450:
            long.append(f"{path.relative_to(ROOT)} ({src.count(chr(10))} lines)")
        for f in ast.walk(ast.parse(src)):
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                    and f.end_lineno - f.lineno + 1 > 80:
                long.append(f"{path.relative_to(ROOT)}:{f.lineno} {f.name}() "
                            f"({f.end_lineno - f.lineno + 1} lines)")
    assert not long, long


def test_loading_a_stage_config_stays_light():
    """config.load checks every section's keys (a typo anywhere fails at the first stage) by
    importing the section's stage module for its dataclass; none of them may pull matplotlib,
    megatron or ModelOpt in at import (seconds per process, and a CPU-only launcher)."""
    code = ("import sys; from recipes.lib import config\n"
            "for stage in ('data', 'convert', 'prune', 'distill', 'export', 'evaluate', 'report',"
            " 'teacher_correction'):\n"
            "    config.load('conf/demo.yaml', ['run.dir=/tmp/x'], stage)\n"
            "print(sorted(m for m in ('matplotlib', 'megatron', 'modelopt', 'lm_eval') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]", out


def test_the_modules_make_test_starts_first_exist():
    """tests/conftest.py's FIRST (the longest modules, started first across the xdist workers)
    names modules that exist: a renamed one would silently end up last, and the suite slower."""
    from tests.conftest import FIRST

    assert all(len(list((ROOT / "tests").rglob(name))) == 1 for name in FIRST), FIRST
