"""The training settings every training stage reads (`TrainConfig`; `KDConfig` adds knowledge
distillation's, for `distill` and prune's tournament), checked when they are read, before any
work; and `resolve_precision`, which makes `precision: auto` concrete for the machine. The loop
that uses them is recipes/lib/train.py. No megatron import here: every stage's config check
reads this module."""
from __future__ import annotations

import dataclasses
import logging
import signal
from pathlib import Path

from recipes.lib import config, megatron_data, runtime
from recipes.lib.preempt import Fault
from recipes.lib.errors import Refusal

log = logging.getLogger(__name__)
PRECISIONS = ("auto", "fp32", "bf16", "fp8")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
# changing these between restarts does not change the numbers a run produces
OPERATIONAL = {"save_interval", "keep_last", "log_interval", "eval_interval", "eval_iters",
               "keep_checkpoints", "output", "preempt_signals", "recompute_layers",
               "min_loss_tokens"}


@dataclasses.dataclass(kw_only=True)
class TrainConfig(config.ModelInput):
    """The training loop's settings; `input` is the model trained."""
    data: list
    """Data stage folders or Megatron dataset prefixes (<prefix>.bin/.idx, imported on first use
    into <run.dir>/data_import/); more than one is a blend; a Megatron-LM blend [0.7, /data/a,
    0.3, /data/b] gives its weights."""
    data_weights: list | None = None
    """Blend weights, one per data folder (default: equal)."""
    min_loss_tokens: float = 0.01
    """Refuse, before any work, masked (chat) training data whose train split has fewer
    loss-bearing tokens than this fraction: windows of prompt alone would make most steps
    learn nothing. 0 switches the check off."""
    seq_length: int = 8192
    """Tokens per sequence (the paper: 8192)."""
    micro_batch_size: int = 1
    """Sequences per micro-batch per data-parallel rank."""
    global_batch_size: int = 1152
    """Sequences per optimizer step, all ranks together (the paper: 1152)."""
    train_iters: int = 9960
    """Optimizer steps (the paper: ~9,960 = 94B tokens)."""
    lr: float = 1e-4
    """Peak learning rate (the paper: 1e-4)."""
    min_lr: float = 1e-5
    """Final learning rate of the cosine decay (the paper: 1e-5)."""
    warmup_iters: int = 40
    """Linear warm-up steps (the paper: 40)."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    clip_grad: float = 1.0
    """Gradient-norm clipping (0: off)."""
    moe_aux_loss_coeff: float = 1e-3
    """A mixture of experts trained: the weight of the routers' load-balancing loss (megatron's
    aux_loss; Qwen3-MoE was trained with 0.001, Mixtral with 0.02); 0: none. Logged, unweighted,
    as load_balancing_loss. A dense model ignores it."""
    precision: str = "auto"
    """auto | fp32 | bf16 | fp8 (Transformer Engine, GPU only: bf16 parameters, fp8 matmuls).
    auto: bf16 on a GPU; on a CPU bf16 only where it is natively fast (runtime.auto_precision),
    else fp32; decided once per run directory, recorded in the manifest."""
    spec: str = "auto"
    """Layer spec: auto (TE when present) | local | te."""
    fp8_recipe: str = "tensorwise"
    """With precision=fp8: megatron's fp8 recipe, tensorwise (current scaling, Megatron-Bridge's
    default) | delayed | blockwise (Hopper and newer) | mxfp8 (Blackwell only). tensorwise
    stores no fp8 state in a checkpoint: TE 2.20 refuses to load the pickled extra state that
    delayed scaling writes, so an fp8 resume or an fp8 output loaded into TE fails with it."""
    fp8_amax_history_len: int = 1024
    """With fp8_recipe=delayed: amax history window (Megatron-LM / NeMo's 1024)."""
    fp8_amax_compute_algo: str = "max"
    """With fp8_recipe=delayed: max | most_recent over the history."""
    fp8_bf16_edge_layers: int = 0
    """With precision=fp8: run this many first and this many last transformer layers in bf16
    (megatron's first_last_layers_bf16); 0: every layer in fp8."""
    optimizer: str = "auto"
    """auto | standard | distributed: megatron's distributed optimizer (fp32 master weights and
    Adam states sharded over DP ranks; its checkpoints reshard across DP sizes) or the standard
    one. auto: distributed wherever NCCL runs (a GPU, at any DP), standard on a CPU, where gloo
    has no reduce-scatter (distributed runs there at DP=1 only, the same numbers)."""
    precision_aware_optimizer: bool = False
    """GPU with Transformer Engine, bf16 or fp8: megatron's precision-aware optimizer (TE's
    FusedAdam) keeps the fp32 master weights as the bf16 weights plus 16-bit remainders, 2
    bytes per parameter less (16 instead of 18 for the student); fp32 Adam moments as before.
    The bf16 weights are then the master's truncation instead of its rounding."""
    overlap_grad_reduce: bool = True
    """Reduce the gradients over data-parallel ranks bucket by bucket (megatron's DDP, buckets
    of 40M elements at any DP) while the step's last backward is still running, instead of all
    at once after it (Megatron-LM's and Megatron-Bridge's default); the same numbers. It lays
    out the distributed optimizer's checkpoint (a part per bucket), so it is fixed for a run;
    at DP=1 as at any DP, so that a checkpoint reshards over DP."""
    recompute_layers: int = 0
    """Activation recompute (megatron's full granularity, block method): the first N transformer
    layers of each pipeline stage keep only their input for the backward and run their forward
    again there; 0: none; N >= the layers per stage: all of them. Memory for time (about a
    third more student compute at all layers; `plan` counts it); the same numbers, so it can
    change between restarts. Not with intermediate_layer_pairs on decoder.layers.*."""
    eval_interval: int = 100
    """Validate every this many steps (and at the end)."""
    eval_iters: int = 4
    """Global batches of the valid split per validation (the same ones every time)."""
    save_interval: int = 500
    """Checkpoint every this many steps (and at the end)."""
    keep_last: int = 2
    """Checkpoints kept."""
    keep_checkpoints: bool = False
    """Keep the training checkpoints (optimizer state) after a successful run."""
    log_interval: int = 1
    """Steps between metrics.jsonl / TensorBoard rows."""
    preempt_signals: list = dataclasses.field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])
    """Signals on which training saves at the end of the current step and exits with code 75
    (empty: the default actions)."""

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise Refusal(f"precision={self.precision!r}; use one of {PRECISIONS}")
        if self.spec not in runtime.SPECS:
            raise Refusal(f"spec={self.spec!r}; use one of {runtime.SPECS}")
        if self.precision == "fp8" and self.spec == "local":
            raise Refusal("precision=fp8 runs its matmuls in Transformer Engine, which the "
                          "local spec does not use; use spec=auto (or te) with fp8, or "
                          "precision=bf16 with spec=local")
        if self.fp8_recipe not in FP8_RECIPES:
            raise Refusal(f"fp8_recipe={self.fp8_recipe!r}; use one of {FP8_RECIPES}")
        if self.fp8_amax_compute_algo not in ("max", "most_recent"):
            raise Refusal(f"fp8_amax_compute_algo={self.fp8_amax_compute_algo!r}; use max "
                          "or most_recent")
        for k in ("fp8_bf16_edge_layers", "recompute_layers", "moe_aux_loss_coeff"):
            if getattr(self, k) < 0:
                raise Refusal(f"{k}={getattr(self, k)} must be >= 0")
        if self.optimizer not in ("auto", "standard", "distributed"):
            raise Refusal(f"optimizer={self.optimizer!r}; use auto, standard or distributed")
        if self.precision_aware_optimizer and self.precision == "fp32":
            raise Refusal("precision_aware_optimizer stores bf16 weights plus remainders: "
                          "use it with precision=bf16 or fp8, or set it false")
        if self.precision_aware_optimizer and self.optimizer == "standard":
            raise Refusal("precision_aware_optimizer runs in megatron's distributed "
                          "optimizer: set optimizer=auto (or distributed)")
        for k in ("seq_length", "micro_batch_size", "global_batch_size", "train_iters",
                  "eval_interval", "eval_iters", "save_interval", "keep_last", "log_interval",
                  "fp8_amax_history_len"):
            if getattr(self, k) < 1:
                raise Refusal(f"{k}={getattr(self, k)} must be >= 1")
        if not 0 <= self.warmup_iters < self.train_iters:
            raise Refusal(f"warmup_iters={self.warmup_iters} must be below "
                          f"train_iters={self.train_iters}")
        if not 0 <= self.min_loss_tokens < 1:
            raise Refusal(f"min_loss_tokens={self.min_loss_tokens} must be in [0, 1)")
        if not 0 <= self.min_lr <= self.lr:
            raise Refusal(f"min_lr={self.min_lr} must be between 0 and lr={self.lr}")
        if isinstance(self.data, str):
            self.data = [self.data]
        paths, weights = megatron_data.parse_blend(self.data)  # [w, path, w, path, ...]
        if weights is not None:
            if self.data_weights is not None:
                raise Refusal("data is a Megatron-LM blend [weight, path, ...] and "
                              "data_weights is set too: give the weights once")
            self.data, self.data_weights = paths, weights
        bad = [x for x in self.preempt_signals if x in ("SIGKILL", "SIGSTOP")
               or not isinstance(getattr(signal, str(x), None), signal.Signals)]
        if bad:
            raise Refusal(f"preempt_signals: {bad} are not signals a process can catch; use "
                          "names like SIGUSR1, SIGTERM")
        Fault()  # a malformed MINITRON_FAULT (tests) fails here, not at the step it names
        if self.data_weights is not None:
            if len(self.data_weights) != len(self.data):
                raise Refusal(f"data_weights has {len(self.data_weights)} entries for "
                              f"{len(self.data)} data folders")
            bad = [w for w in self.data_weights if isinstance(w, bool)
                   or not isinstance(w, (int, float)) or not 0 < w < float("inf")]
            if bad:
                raise Refusal(f"data_weights={self.data_weights}: {bad} are not positive "
                              "numbers; give one weight > 0 per data folder, e.g. [0.7, 0.3]")

    def memory_settings(self) -> dict:
        """What changes this run's GPU memory, as arch.training_memory's keywords (the
        training stage's out-of-memory note and the GPU benchmark count the same; `plan` reads
        them from the recipe's raw distill section)."""
        return {"precision_aware": self.precision_aware_optimizer, "precision": self.precision,
                "teacher_precision": "bf16", "bf16_edge_layers": self.fp8_bf16_edge_layers,
                "recompute_layers": self.recompute_layers}


@dataclasses.dataclass(kw_only=True)
class KDConfig(TrainConfig):
    """The training settings plus knowledge distillation's (recipes/lib/kd.py): what `distill`
    trains with, and each of prune's tournament candidates."""
    kd_temperature: float = 1.0
    """Softmax temperature of the logit KL."""
    skip_lm_loss: bool = True
    """Train on the KD loss only (the paper); false adds the student's cross-entropy."""
    kd_loss_scale: float = 1.0
    """Weight of the KD loss against the LM loss when skip_lm_loss=false (ModelOpt balancer)."""
    intermediate_layer_pairs: list | None = None
    """[[student_module, teacher_module, cosine|mse], ...], e.g.
    [[decoder.final_layernorm, decoder.final_layernorm, cosine]]."""
    teacher_precision: str | None = None
    """Precision of the frozen teacher, whose logits are the target: default the student's
    (auto included), except that precision=fp8 keeps the teacher in bf16 unless
    teacher_precision=fp8."""

    def __post_init__(self):
        super().__post_init__()
        if self.teacher_precision is None:
            self.teacher_precision = "bf16" if self.precision == "fp8" else self.precision
        if self.teacher_precision not in PRECISIONS:
            raise Refusal(f"teacher_precision={self.teacher_precision!r}; use one of "
                          f"{PRECISIONS}")
        if self.teacher_precision == "fp8" and self.spec == "local":
            raise Refusal("teacher_precision=fp8 needs the TE spec; use spec=auto (or te)")
        if self.kd_temperature <= 0 or self.kd_loss_scale <= 0:
            raise Refusal("kd_temperature and kd_loss_scale must be > 0")
        for pair in self.intermediate_layer_pairs or []:
            if len(pair) not in (2, 3) or (len(pair) == 3 and pair[2] not in ("cosine", "mse")):
                raise Refusal(f"intermediate_layer_pairs entry {pair}: use "
                              "[student_module, teacher_module, cosine|mse]")
            if self.recompute_layers and str(pair[0]).startswith("decoder.layers."):
                raise Refusal(  # its hook would see the no-grad forward: a loss, no gradient
                    f"intermediate_layer_pairs entry {pair} with recompute_layers="
                    f"{self.recompute_layers}: a recomputed layer's output is first computed "
                    "without gradients, so that loss would train nothing; pair "
                    "decoder.final_layernorm instead, or set recompute_layers=0")

    def memory_settings(self) -> dict:
        return {**super().memory_settings(), "teacher_precision": self.teacher_precision}


def resolve_precision(c: TrainConfig, run_dir: str | Path) -> tuple[TrainConfig, dict | None]:
    """`c` with `auto` precisions (the student's, a KD teacher's) made concrete for this machine
    (runtime.auto_precision: one choice per run directory), and that choice with its reason;
    None when nothing was auto."""
    auto = [k for k in ("precision", "teacher_precision") if getattr(c, k, None) == "auto"]
    if not auto:
        return c, None
    choice = runtime.auto_precision(run_dir)
    log.info("precision=auto: %s (%s)", choice["precision"], choice["why"])
    return dataclasses.replace(c, **dict.fromkeys(auto, choice["precision"])), choice
