"""The upstream messages this recipe expects, silenced in one place, each with its reason.

Installed by `recipes/__init__.py` (warnings: before any upstream import can raise one) and by
`runtime.setup_logging` (log records). Everything not listed here is shown: our progress bars and
stage summaries, upstream errors and every warning nobody has read yet. `run.log_level=DEBUG`
shows all of it again. When an upstream release changes a message, its entry stops matching and
the message reappears (tests/stages/test_distill.py runs a training stage and reads its
log).
"""
from __future__ import annotations

import logging
import re
import warnings

# (message regex, category, why it is expected here)
EXPECTED_WARNINGS = [
    (r"Transformer Engine and Apex are not installed", UserWarning,
     "no TE/Apex off the GPU container: megatron falls back to torch optimizers and local "
     "multi-tensor ops, which is what the CPU path runs (runtime.resolve_spec chooses the spec)"),
    (r"Apex is not installed\. Falling back to Torch Norm", UserWarning,
     "the local layer spec uses torch's RMSNorm on purpose"),
    (r"Failed to import modelopt .*plugin", UserWarning,
     "ModelOpt probes plugins for packages this recipe does not use; compat.enable_modelopt "
     "imports the Megatron ones itself"),
    (r"transformers .* is not tested with current version of modelopt", UserWarning,
     "transformers is pinned for the export parity checks; ModelOpt's HF plugins are not used"),
    (r"MimoModelConfig is experimental", UserWarning,
     "megatron imports its multimodal models package; not used"),
    (r"full scope is deprecated", UserWarning,
     "a CUDA-graph default inside megatron's TransformerConfig; graphs are not used"),
    (r"Could not determine rank from torch\.distributed", UserWarning,
     "evaluate and report import megatron without a process group: a single process is rank 0"),
    (r"torch\.distributed is disabled, unavailable or uninitialized", UserWarning,
     "single-process checkpoint reads (export, evaluate) load without a process group"),
    (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning,
     "megatron's torch_dist checkpoint format is built on ShardedTensor (megatron's choice)"),
    (r"The argument order of load has been changed", UserWarning,
     "megatron's dist_checkpointing calls torch.distributed.checkpoint.load by keyword"),
    (r"Only transformer-engine>=1\.7\.0 supports MoE experts, but your version is 0\.0\.0",
     UserWarning, "compat's Transformer Engine stand-in (so ModelOpt's Minitron plugin imports "
     "without TE) has no version; no MoE model is built"),
    (r"Per-rank checkpoint .*scores.* not found, falling back|Checkpoint .*scores.* does not "
     r"exist! Initializing from scratch", UserWarning,
     "prune always starts in a fresh folder: ModelOpt finds no saved importance scores and "
     "computes them"),
    (r"torch\.distributed is initialized\. Please maintain the same parallelism configuration",
     UserWarning, "ModelOpt saves the importance scores per rank; prune's scores live only in "
     "its own temporary folder, read back in the same run"),
    (r"`torch_dtype` is deprecated|torch_dtype.*deprecated", FutureWarning,
     "lm-evaluation-harness still passes torch_dtype to transformers"),
]
# (logger prefix, message regex, why)
EXPECTED_LOGS = [
    ("megatron.core.models.gpt", r"GPTModel IS DEPRECATED",
     "ModelOpt 0.47's mcore_minitron prunes GPTModel; HybridModel is not supported there yet"),
    ("megatron.core.dist_checkpointing", r"MCore's async save is deprecated",
     "logged by every synchronous torch_dist save too; nothing is saved asynchronously"),
    ("lm_eval", r"Overwriting default num_fewshot",
     "the recipe sets each task's shots explicitly (the paper's)"),
]
# upstream loggers whose INFO lines (dataset indexing, FSDP detection, lm-eval's per-task
# set-up) say nothing a user acts on: WARNING and above unless run.log_level=DEBUG
CHATTY_LOGGERS = ("megatron", "modelopt", "lm_eval", "torch.distributed")


def install_warning_filters(action: str = "ignore") -> None:
    for pattern, category, _why in EXPECTED_WARNINGS:
        warnings.filterwarnings(action, message=f".*{pattern}", category=category)


class ExpectedLogFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for prefix, pattern, _why in EXPECTED_LOGS:
            if record.name.startswith(prefix) and re.search(pattern, record.getMessage()):
                return False
        return True


def install_log_filters(level: str) -> None:
    """After logging.basicConfig: drop the expected records; quiet the chatty loggers."""
    if level == "DEBUG":  # the same entries, shown (once per place) ahead of the ignores
        install_warning_filters("default")
        return
    for h in logging.getLogger().handlers:
        h.addFilter(ExpectedLogFilter())
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
