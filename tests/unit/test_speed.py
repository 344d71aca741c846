"""evaluate's generation throughput (recipes/lib/speed.py): several models' runs interleaved on
the same prompts, so that a host whose speed drifts slows them alike, and decode time as
generate's minus a prefill's."""
import time

import torch

from recipes.lib import speed


class Fake(torch.nn.Module):
    """A model whose prefill takes `prefill_s` and generate `generate_s`, times `host[0]` (the
    host's slowness, drifting as the test goes); it logs each call."""

    def __init__(self, name, calls, host, prefill_s, generate_s):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1, dtype=torch.bfloat16))
        self.name, self.calls, self.host = name, calls, host
        self.prefill_s, self.generate_s = prefill_s, generate_s

    def forward(self, ids, attention_mask, use_cache):
        assert ids.shape == attention_mask.shape and use_cache
        self.calls.append(("prefill", self.name, ids.shape[0]))
        time.sleep(self.prefill_s * self.host[0])

    def generate(self, ids, attention_mask, max_new_tokens, min_new_tokens, do_sample,
                 pad_token_id):
        assert max_new_tokens == min_new_tokens == 5 and not do_sample
        assert int(ids.max()) < 50  # ids every model has
        self.calls.append(("generate", self.name, ids.shape[0]))
        time.sleep(self.generate_s * self.host[0])
        self.host[0] *= 1.12  # the host slows down after each run


def test_runs_are_interleaved_and_a_drifting_host_slows_every_model_alike():
    calls, host = [], [1.0]
    models = {"a": Fake("a", calls, host, 0.005, 0.045),
              "b": Fake("b", calls, host, 0.005, 0.045)}  # the same cost
    out = speed.generation_speeds(models, 50, 8, 5, [1, 2], repeats=3)
    gens = [(n, b) for kind, n, b in calls if kind == "generate"]
    assert gens == [(n, b) for b in (1, 2) for _ in range(4) for n in ("a", "b")]
    for name in models:
        assert set(out[name]) >= {"batch_1", "batch_2"} and out[name]["dtype"] == "bfloat16"
        assert out[name]["repeats"] == 3 and out[name]["device"] == "cpu"
    # the host slowed 1.12x per run, 6x over the test; interleaved, the same-cost models' decode
    # speeds stay within that one step of each other (one model after the other: 1.12^4 = 1.6x)
    for b in ("batch_1", "batch_2"):
        ratio = out["b"][b]["decode_tokens_per_s"] / out["a"][b]["decode_tokens_per_s"]
        assert 1 / 1.3 < ratio < 1.3, ratio


def test_decode_is_generate_less_a_prefill():
    model = Fake("m", [], [1.0], 0.02, 0.10)
    model.generate = lambda *a, **k: time.sleep(0.10)  # a steady host
    out = speed.generation_speeds({"m": model}, 50, 8, 5, [2], repeats=1)["m"]["batch_2"]
    assert abs(out["decode_tokens_per_s"] - 2 * 4 / (0.10 - 0.02)) / (2 * 4 / 0.08) < 0.25
    assert abs(out["prefill_tokens_per_s"] - 2 * 8 / 0.02) / (2 * 8 / 0.02) < 0.5
