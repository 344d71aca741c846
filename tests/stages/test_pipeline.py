"""The demo's pipeline end to end on a tiny trained model: data, convert, prune, distill, both
exports, evaluate, report. The report and its plots exist and its tables hold numbers."""
import json
import re

from recipes import distill, evaluate, export, prune, report
from tests.conftest import TINY


def test_pipeline_to_report(trained_run, tmp_path):
    run = tmp_path / "run"  # the shared trained teacher's data and convert, then the rest here
    run.mkdir()
    for done in ("data", "convert"):
        (run / done).symlink_to(trained_run["run"] / done)
    common = ["--config", TINY, f"run.dir={run}", f"convert.hf_path={trained_run['hf']}"]
    prune.main([*common, "prune.num_layers=3"])  # width and contiguous depth
    distill.main([*common, "distill.train_iters=12", "distill.save_interval=12"])
    export.main([*common, f"export.input={run / 'prune'}", f"export.output={run / 'export_pruned'}"])
    export.main([*common, f"export.input={run / 'distill'}"])
    evaluate.main(common)
    report.main(common)

    md = (run / "report" / "report.md").read_text()
    for png in ("training.png", "importance.png", "depth_candidates.png", "evaluation.png"):
        assert (run / "report" / png).stat().st_size > 10_000, png
        assert f"]({png})" in md
    res = json.loads((run / "evaluate" / "results.json").read_text())
    for name in ("teacher", "pruned", "distilled"):
        row = re.search(rf"^\| {name} \| {re.escape(report.DESCRIBED[name])} \| [\d.]+M \| "
                        r"([\d.]+) \| ([\d.]+) \|$", md, re.M)
        assert row, name
        assert float(row.group(1)) == round(res["heldout"][name]["loss"], 4)
    h = res["heldout"]
    assert h["distilled"]["params"] == h["pruned"]["params"] < h["teacher"]["params"]
    assert h["distilled"]["loss"] < h["pruned"]["loss"]
    assert re.search(r"^\| parameters \| [\d.]+M \| [\d.]+M \([\d.]+%\) \|$", md, re.M)
    assert re.search(r"^\| distill \| [\d.]+ \|$", md, re.M)  # wall time
    assert "*distilled*:" in md  # sample generations
    speed = re.search(r"Median logged step: ([\d,]+) tokens/s, ([\d.e+-]+) model TFLOP/s per "
                      r"rank\.", md)  # a CPU: no MFU
    rows = [json.loads(x) for x in (run / "distill" / "logs" / "metrics.jsonl").open()][1:]
    assert sorted(round(r["tokens_per_s"]) for r in rows)[len(rows) // 2] == \
        int(speed.group(1).replace(",", ""))
