"""The tournament's teacher-logit cache (prune.search.teacher_cache): the teacher runs once over
every micro-batch the tournament reads (training steps and validation), its output-layer
logits are written to disk keyed by a hash of the tokens, and a `CachedTeacher` replays them to
every candidate inside ModelOpt's DistillationModel, so K candidates cost one teacher pass.

Two encodings, one file per micro-batch:
  full   the logits as the teacher computed them (its dtype, the padded vocabulary): replayed
         KD losses equal online ones.
  top-K  per token the K largest logits over the real vocabulary (teacher dtype), their indices
         (int32) and the log-sum-exp of all of them (fp32): K * (2 + 4) + 4 bytes a token
         instead of vocab * 2. Replayed as the K logits as they were and every other token at
         the one value that gives the tail its true total probability (1 - the top K's), so
         at temperature 1 the teacher's top-K log-probabilities and its tail mass are exact;
         only how the tail mass spreads over the tail is lost (the mean tail mass recorded is
         reported in search.json: the KD signal the encoding flattens).
Which (`choose`): `teacher_cache_top_k` = K forces top-K; null chooses: the full vocabulary
while the whole cache fits `teacher_cache_max_gb`, else the largest power-of-two K that fits
(at least MIN_TOP_K), else no cache (the teacher runs online for each candidate).

Parallel layouts: prune (and so its tournament) runs at TP=1. Under PP the last stage records
and replays; on the other stages the CachedTeacher passes a 1-channel placeholder down the
pipeline (ModelOpt sends the teacher's activations beside the student's between stages, sized
by the teacher config's hidden_size, which the CachedTeacher's config sets to 1). Each
data-parallel rank records the micro-batches it reads.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch

from recipes.lib import batches, compat, runtime, train, train_config, train_stage
from recipes.lib.errors import MissingKey

compat.importable()  # megatron's import needs triton or its stand-in; apply() at use
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402

log = logging.getLogger(__name__)

MIN_TOP_K = 16
BYTES = {"fp32": 4, "bf16": 2}
FILE_OVERHEAD = 4096  # torch.save's zip headers and pickle, per micro-batch file (measured: 3.1 KB)


def choose(n_tokens: int, n_files: int, padded_vocab: int, vocab: int, dtype: str,
           top_k: int | None, max_gb: float) -> dict:
    """The encoding for `n_tokens` tokens in `n_files` micro-batch files: {encoding: full |
    top-k | online, top_k, mb (the cache's size: MiB, file overhead included), full_mb}."""
    overhead = n_files * FILE_OVERHEAD
    full = n_tokens * padded_vocab * BYTES[dtype] + overhead
    per_k = n_tokens * (BYTES[dtype] + 4)  # a value and an int32 index
    fixed = n_tokens * 4 + overhead  # the log-sum-exp, and each file's own bytes
    out = {"full_mb": round(full / 2**20, 1)}
    if top_k is None:
        if full <= max_gb * 2**30:
            return {**out, "encoding": "full", "top_k": None, "mb": out["full_mb"]}
        fit = int((max_gb * 2**30 - fixed) // per_k)
        top_k = 1 << (fit.bit_length() - 1) if fit >= 1 else 0
        if top_k < MIN_TOP_K:
            return {**out, "encoding": "online", "top_k": None, "mb": 0.0,
                    "why": f"even the top {MIN_TOP_K} logits would take "
                           f"{(per_k * MIN_TOP_K + fixed) / 2**20:,.0f} MB, over "
                           f"teacher_cache_max_gb={max_gb:g}"}
    top_k = min(int(top_k), vocab)
    return {**out, "encoding": "top-k", "top_k": top_k,
            "mb": round((per_k * top_k + fixed) / 2**20, 1)}


def encode(logits: torch.Tensor, vocab: int, top_k: int | None):
    """What one micro-batch's file holds: the logits [..., padded vocab] as they are (top_k
    None), or their top-K over the real vocabulary, indices and log-sum-exp; contiguous."""
    if top_k is None:
        return logits.detach().cpu().clone(memory_format=torch.contiguous_format)
    x = logits[..., :vocab].float().contiguous()
    values, indices = x.topk(top_k, dim=-1)
    return {"values": values.to(logits.dtype).cpu(), "indices": indices.int().cpu(),
            "lse": torch.logsumexp(x, dim=-1).cpu(),
            "shape": torch.tensor(logits.shape), "vocab": torch.tensor(vocab)}


def tail_mass(entry) -> torch.Tensor:
    """Per token, the teacher's probability outside the stored top K (0 for a full entry)."""
    if not isinstance(entry, dict):
        return torch.zeros(())
    top = (entry["values"].float() - entry["lse"].unsqueeze(-1)).exp().sum(-1)
    return (1 - top).clamp_min(0)


def decode(entry, device=None) -> torch.Tensor:
    """The logits [..., padded vocab] a file stands for (see the module's note on top-K)."""
    if not isinstance(entry, dict):
        return entry.to(device)
    vocab, k = int(entry["vocab"]), entry["values"].shape[-1]
    values = entry["values"].to(device).float()
    lse = entry["lse"].to(device)
    if k < vocab:  # the tail's true mass, spread evenly over the tail
        rest = tail_mass(entry).to(device).clamp_min(1e-30)
        fill = lse + torch.log(rest / (vocab - k))
    else:  # nothing but padding outside the top K: no probability there
        fill = lse - 1e4
    out = fill.unsqueeze(-1).expand(*entry["shape"].tolist()).clone()
    return out.scatter_(-1, entry["indices"].to(device).long(), values)


def key(tokens: torch.Tensor) -> str:
    t = tokens.detach().cpu().contiguous()
    return hashlib.sha1(t.numpy().tobytes() + str(tuple(t.shape)).encode()).hexdigest()


class _Replay(torch.nn.Module):
    """Stands where the teacher's output layer was: ModelOpt's hook on it captures the replayed
    logits exactly as megatron's ColumnParallelLinear returns them, (output, bias)."""

    def forward(self, logits):
        return logits, None


class _NoDecoder(torch.nn.Module):
    """What ModelOpt's pipeline hook reaches for on the teacher (GPTModel.set_input_tensor calls
    decoder.set_input_tensor); the replay has no layers to feed."""

    def set_input_tensor(self, tensor):
        pass


class CachedTeacher(torch.nn.Module):
    """The teacher in a tournament run: the recorded logits of each micro-batch, found by its
    tokens. `config`: the teacher's TransformerConfig (hidden_size set to 1: the placeholder
    ModelOpt passes between pipeline stages)."""

    def __init__(self, config, folder: Path):
        super().__init__()
        self.config = copy.copy(config)
        self.config.hidden_size = 1
        self.folder = Path(folder)
        self.output_layer = _Replay()
        self.decoder = _NoDecoder()

    def forward(self, input_ids, position_ids=None, attention_mask=None, *args, **kwargs):
        if not ps.is_pipeline_last_stage():  # [s, b, 1]: the teacher's share of the send
            return torch.zeros(input_ids.shape[1], input_ids.shape[0], 1,
                               dtype=self.config.params_dtype, device=input_ids.device)
        f = self.folder / f"{key(input_ids)}.pt"
        if not f.is_file():
            raise MissingKey(f"{f}: no cached teacher logits for this batch (the tournament's data "
                             "or settings changed since they were recorded)")
        logits = decode(torch.load(f, map_location="cpu", weights_only=True), input_ids.device)
        return self.output_layer(logits)[0].transpose(0, 1)  # [s, b, v] -> GPTModel's [b, s, v]


def record(teacher: tuple, dc: train_config.KDConfig, seed: int, folder: Path,
           top_k: int | None) -> dict:
    """The teacher's logits for every micro-batch a tournament run of `dc` reads, one file per
    batch (`encode`), through megatron's pipeline schedule one global batch at a time, each
    written as its forward finishes on the last stage. Reused when complete for the same
    batches and encoding; a killed recording keeps its finished files. Returns {batches, mb,
    encoding, top_k, tail_mass_mean, tail_mass_max}."""
    done = folder / "complete.json"
    want = {"train_iters": dc.train_iters, "eval_iters": dc.eval_iters,
            "global_batch_size": dc.global_batch_size, "micro_batch_size": dc.micro_batch_size,
            "seq_length": dc.seq_length, "top_k": top_k}
    if done.is_file() and json.loads(done.read_text()).get("settings") == want:
        return json.loads(done.read_text())
    runtime.barrier()
    runtime.on_rank0(lambda: _prepare(folder, top_k))
    runtime.barrier()
    arch = teacher[0]
    model = train_stage.build_loaded(dc, teacher, dc.teacher_precision)
    model.eval()

    def save(tokens, output, non_loss_data=True):
        f = folder / f"{key(tokens)}.pt"
        tmp = f.with_name(f"{f.stem}.{torch.distributed.get_rank()}.tmp")
        # stored as the output layer computes them, [s, b, v]: replayed contiguous
        torch.save(encode(output.transpose(0, 1), arch.vocab_size, top_k), tmp)
        tmp.replace(f)
        return torch.zeros(())

    def step(data_iter, m):
        b = train.on_device(next(data_iter), m)
        return (m(b["tokens"], b["position_ids"], attention_mask=None),
                functools.partial(save, b["tokens"]))

    fb = get_forward_backward_func()
    with torch.no_grad():
        for batches in filter(None, _todo(dc, seed, folder)):
            fb(forward_step_func=step, data_iterator=iter(batches), model=[model],
               num_microbatches=len(batches), seq_length=dc.seq_length,
               micro_batch_size=dc.micro_batch_size, forward_only=True,
               collect_non_loss_data=True)
    del model
    runtime.barrier()
    runtime.on_rank0(lambda: _complete(folder, want, top_k))
    runtime.barrier()
    return json.loads(done.read_text())


def _prepare(folder: Path, top_k: int | None) -> None:
    """The cache folder, emptied when it holds another encoding; not complete."""
    (folder / "complete.json").unlink(missing_ok=True)
    enc = folder / "encoding.json"
    if folder.is_dir() and (not enc.is_file() or json.loads(enc.read_text()) != top_k):
        shutil.rmtree(folder)  # recorded with another encoding
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "encoding.json").write_text(json.dumps(top_k))


def _todo(dc: train_config.KDConfig, seed: int, folder: Path) -> list[list[dict]]:
    """Per global batch of the tournament (training steps, then validation), the micro-batches
    still to record. Decided on every rank before any file is written (a killed recording's
    files are kept; a batch met twice is recorded once): the stages of a pipeline agree."""
    train_ds, valid_ds = batches.datasets(dc, seed, folder.parent / "data_index")
    n_micro = train.check_layout(dc, ps.get_data_parallel_world_size())
    steps = [batches.micro_batches(train_ds, i, dc, n_micro) for i in range(dc.train_iters)]
    steps += [batches.micro_batches(valid_ds, i, dc, n_micro) for i in range(dc.eval_iters)]
    runtime.barrier()
    seen, todo = set(), []
    for step in steps:
        todo.append([])
        for b in step:
            k = key(b["tokens"])
            if k not in seen and not (folder / f"{k}.pt").is_file():
                todo[-1].append(b)
            seen.add(k)
    return todo


def _complete(folder: Path, want: dict, top_k: int | None) -> None:
    """complete.json (atomically): the settings recorded, the cache's size and tail mass."""
    files = sorted(folder.glob("*.pt"))
    tails = [tail_mass(torch.load(f, weights_only=True)) for f in files] if top_k else []
    tails = torch.cat([t.flatten() for t in tails]) if tails else torch.zeros(1)
    out = {"settings": want, "batches": len(files), "encoding": "top-k" if top_k else "full",
           "top_k": top_k, "mb": round(sum(f.stat().st_size for f in files) / 2**20, 1),
           "tail_mass_mean": float(tails.mean()), "tail_mass_max": float(tails.max())}
    done = folder / "complete.json"
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(out) + "\n")
    tmp.replace(done)
