import os
import subprocess
import sys
from pathlib import Path

import pytest

# Under pytest-xdist (`make test` runs TEST_JOBS workers), each worker and every process it starts
# gets its share of the cores before torch is imported: with two OpenMP threads each, two workers
# on two cores oversubscribe them, and an in-process training test ran 4x slower.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(
        1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
import torch  # noqa: E402  (after OMP_NUM_THREADS)

from tests.tiny_models import write_tiny_llama  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "conf" / "tiny.yaml")
# the longest modules first (measured on 2 cores: 80-360 s each, the Slurm one mostly waiting
# on its jobs), so that `--dist loadfile` starts them at once and the short ones fill in after
FIRST = ("test_slurm.py", "test_distill.py", "test_search.py", "test_integrity.py",
         "test_moe.py", "test_moe_stages.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda it: rank.get(it.path.name, len(FIRST)))  # stable: the rest in order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """{variant: folder} of tiny random HF Llama checkpoints, written once per session."""
    base = tmp_path_factory.mktemp("hf")
    return {v: write_tiny_llama(base / v, v) for v in ("gqa", "tied")}


def torchrun(module: str, *args: str, nproc: int = 2, timeout: int = 300, ok: bool = True,
             env: dict | None = None):
    """Run `torchrun --nproc-per-node N -m module args` (`env`: added to the environment);
    unless ok=False, fail with its output on error."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--standalone", "-m", module, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode == 0 or not ok, f"{' '.join(cmd)} failed:\n{p.stdout[-4000:]}\n{p.stderr[-8000:]}"
    return p


def train_tiny(src, dst, corpus, steps=200, seed=0):
    """Briefly train an HF tiny Llama on the synthetic corpus (plain PyTorch), save to dst."""
    import json as _json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    text = "".join(_json.loads(line)["text"] for line in open(corpus / "docs.jsonl"))
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (16,), generator=g)
        batch = torch.stack([ids[s: s + 65] for s in starts])
        loss = model(batch[:, :-1], labels=batch[:, :-1]).loss  # labels shift inside
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


@pytest.fixture(scope="session")
def trained_run(hf_models, tmp_path_factory):
    """A trained tiny teacher, its data stage and its converted checkpoint (fp32)."""
    from recipes import convert, data
    from tests.corpus import write_corpus

    base = tmp_path_factory.mktemp("trained")
    corpus = write_corpus(base / "corpus")
    hf = train_tiny(hf_models["gqa"], base / "hf", corpus)
    run = base / "run"
    common = ["--config", TINY, f"run.dir={run}", f"convert.hf_path={hf}"]
    data.main([*common, f"data.input={corpus}"])
    convert.main(common)
    return {"run": run, "hf": hf, "corpus": corpus}
