"""lm-evaluation-harness (pinned) through the evaluate stage, offline, on local tasks: a
multiple-choice task and a generation task over local JSONL files, run by the real harness on a
briefly trained tiny Llama. Its accuracy must equal an independent computation of the same
log-likelihood choices / greedy generations with transformers. Also: a task without data is
reported unavailable (never scored), the held-out cloze task and the throughput measurement."""
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from recipes import evaluate
from recipes.lib import harness
from tests.conftest import TINY
from tests.corpus import ALPHABET

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is pinned in requirements.txt")


def write_task(folder, name, docs, body):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {json.dumps(str(folder / (name + '.jsonl')))}}}}}\n"
        f"test_split: test\n{body}")


def mc_docs(n=40, seed=0):
    """Six letters of the alphabet run, then: which letter comes next? (4 choices)"""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        i = rng.randrange(26)
        context = "".join(ALPHABET[(i + k) % 26] for k in range(6))
        right = ALPHABET[(i + 6) % 26]
        choices = rng.sample([c for c in ALPHABET if c != right], 3)
        label = rng.randrange(4)
        choices.insert(label, right)
        docs.append({"context": context, "choices": choices, "label": label})
    return docs


MC_TASK = ("output_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
           "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
           "target_delimiter: ''\nmetric_list:\n  - {metric: acc}\n")  # the letter follows


@torch.no_grad()
def independent_mc_accuracy(hf, docs) -> float:
    """argmax over choices of sum log p(choice | context), as lm-eval defines it (the task's
    target_delimiter is empty: the next letter follows the run): the continuation's tokens are
    those of context + continuation past the context's."""
    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    right = 0
    for d in docs:
        ctx = tok(d["context"])["input_ids"]
        lls = []
        for ch in d["choices"]:
            whole = tok(d["context"] + ch)["input_ids"]
            cont = whole[len(ctx):]
            logp = model(torch.tensor([whole[:-1]])).logits.log_softmax(-1)[0]
            lls.append(sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
        right += max(range(len(lls)), key=lls.__getitem__) == d["label"]
    return right / len(docs)


@torch.no_grad()
def greedy(hf, prompts, n):
    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt")["input_ids"]
        g = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
        out.append(tok.decode(g[0, ids.shape[1]:]))
    return out


def run_evaluate(trained_run, tmp_path, *extra):
    out = tmp_path / "ev"
    args = ["--config", TINY, f"run.dir={trained_run['run']}",
            f"convert.hf_path={trained_run['hf']}", f"evaluate.output={out}",
            f"evaluate.models={{trained: {trained_run['hf']}}}", "evaluate.prompts=null",
            "evaluate.lm_eval_batch_size=4", "evaluate.include=[trained]", *extra]
    assert evaluate.main(args) == 0
    return json.loads((out / "results.json").read_text())


def test_harness_agrees_with_an_independent_computation(trained_run, tmp_path):
    hf = trained_run["hf"]
    tasks = tmp_path / "tasks"
    docs = mc_docs()
    write_task(tasks, "tiny_mc", docs, MC_TASK)
    prompts = [d["context"] for d in docs[:20]]
    outs = greedy(hf, prompts, 3)
    gen_docs = [{"prompt": p, "answer": o if i % 2 == 0 else "nope"}  # half right, half wrong
                for i, (p, o) in enumerate(zip(prompts, outs))]
    write_task(tasks, "tiny_gen", gen_docs, "output_type: generate_until\n"
               "doc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
               "generation_kwargs: {until: ['<2>'], max_gen_toks: 3, do_sample: false}\n"
               "metric_list:\n  - {metric: exact_match}\n")
    res = run_evaluate(trained_run, tmp_path, f"evaluate.task_paths=[{tasks}]",
                       "evaluate.tasks=[tiny_mc, {task: tiny_gen, metric: 'exact_match,none'}]",
                       "evaluate.suite=null")["lm_eval"]
    want = independent_mc_accuracy(hf, docs)
    assert want > 0.5  # the trained model knows the alphabet: a test that can fail
    assert res["tiny_mc"]["scores"]["trained"] == pytest.approx(want, abs=1e-9)
    assert res["tiny_mc"]["metric"] == "acc,none" and res["tiny_mc"]["num_fewshot"] == 0
    assert res["tiny_gen"]["scores"]["trained"] == pytest.approx(0.5, abs=1e-9)
    assert res["tiny_mc"]["retention"]["trained"] == pytest.approx(1.0)


def test_a_task_without_data_is_unavailable_not_scored(trained_run, tmp_path):
    res = run_evaluate(trained_run, tmp_path, "evaluate.tasks=[{task: winogrande, "
                       "num_fewshot: 5}]", "evaluate.lm_eval_limit=2")["lm_eval"]
    assert "unavailable" in res["winogrande"] and "scores" not in res["winogrande"]


def test_the_paper_suite_is_data():
    specs = {s["task"]: s for s in harness.task_specs("minitron", [{"task": "gsm8k",
                                                                     "num_fewshot": 8}])}
    assert list(specs) == ["mmlu", "winogrande", "arc_challenge", "hellaswag", "gsm8k",
                           "truthfulqa_mc2"]
    assert specs["arc_challenge"] == {"task": "arc_challenge", "num_fewshot": 25,
                                      "metric": "acc_norm,none"}
    assert specs["gsm8k"]["num_fewshot"] == 8  # overridable
    assert specs["truthfulqa_mc2"]["num_fewshot"] == 0


def test_cloze_accuracy_and_speedup_columns(trained_run, tmp_path):
    """The cloze task built from the test split, scored by the harness, and the generation
    throughput; the report's evaluation table gains both columns."""
    from recipes import report

    res = run_evaluate(trained_run, tmp_path, "evaluate.cloze=true", "evaluate.cloze_samples=16",
                       "evaluate.cloze_tokens=40", "evaluate.speed=true",
                       "evaluate.speed_batch_sizes=[1,2]", "evaluate.speed_new_tokens=4",
                       "evaluate.speed_prompt_tokens=16", "evaluate.speed_repeats=1",
                       f"evaluate.models={{trained: {trained_run['hf']}, "
                       f"again: {trained_run['hf']}}}", "evaluate.include=[trained,again]")
    cloze = res["lm_eval"]["heldout_cloze"]
    assert 0 <= cloze["scores"]["trained"] <= 1
    assert cloze["scores"]["trained"] == cloze["scores"]["again"]  # same model, same score
    for name in ("trained", "again"):
        for b in ("batch_1", "batch_2"):
            assert res["speed"][name][b]["decode_tokens_per_s"] > 0
    assert res["speedup"]["trained"] == {"batch_1": 1.0, "batch_2": 1.0}
    lines = report.evaluation_lines(res, {"windows": 8, "seq_length": 64})
    assert "held-out cloze accuracy" in lines[4] and "decode speed-up, batch 2" in lines[4]
