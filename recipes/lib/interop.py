"""The checkpoint folder layout NVIDIA's training stack reads and writes, so that our stage outputs
are Megatron-Bridge / Megatron-LM checkpoints and theirs are inputs to our stages.

A checkpoint stage's folder (convert, teacher_correction, prune, distill) is such a checkpoint
root, with our own files beside it:

    <stage>/latest_checkpointed_iteration.txt   the iteration (Megatron-LM's tracker; Bridge
                                                 falls back to it)
    <stage>/iter_0000050/                        megatron-core torch_dist: metadata.json,
        .metadata, __*_*.distcp                  .metadata, shards; common state
                                                 checkpoint_version=3.0, iteration=50
        run_config.yaml                          Bridge's model provider (GPTModelProvider) and
                                                 checkpoint section, from our Arch
    <stage>/manifest.json, hf_config.json, tokenizer/, config.yaml, logs/   (ours)

The tensors need no translation: megatron-core's sharded keys (TE spec and local spec alike)
are what Bridge's and MLM's GPT models load. Vocabulary: we pad the embedding and output layer
to a multiple of 128 rows; Bridge's run_config records the real vocabulary
(`should_pad_vocab: false`), and megatron loads the embedding with `allow_shape_mismatch`, so
Bridge reads the real rows and its HF export is exact. The other way, rows our model has past
the checkpoint's are zeroed after loading (`checkpoint.load`).

Reading (`open_source`): a folder with our manifest.json is one of our stages; otherwise a
Bridge or MLM root (tracker -> iteration folder; `release` too), or an iteration folder itself.
The architecture comes from run_config.yaml's model section, or from an HF config.json the user
names (`*_hf_config`: a config.json or an HF folder, whose tokenizer is then used too).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from recipes.lib import integrity
from recipes.lib.arch import FAMILIES, Arch, megatron_moe, read_hf_config
from recipes.lib.stage import read_manifest
from recipes.lib.errors import MissingInput, MissingKey, Refusal

TRACKER = "latest_checkpointed_iteration.txt"
RUN_CONFIG = "run_config.yaml"
CHECKPOINT_VERSION = 3.0  # megatron's: < 2.0 makes Megatron-LM reorder QKV on load
# the common-state keys megatron-core, Bridge and Megatron-LM put beside the model: loading
# the model allows exactly these (checkpoint.load); any other key is refused by name
COMMON_STATE_KEYS = ("checkpoint_version", "iteration", "content_metadata", "args",
                     "num_floating_point_operations_so_far", "opt_param_scheduler",
                     "rerun_state_machine_state", "train_state_metadata", "modelopt_state")
# sharded state a training checkpoint holds besides the model: not loaded, allowed
TRAINING_STATE_PREFIXES = ("optimizer.", "rng_state", "rerun_state_machine_state")
TORCH_DTYPES = {"bf16": "torch.bfloat16", "fp32": "torch.float32", "fp16": "torch.float16"}
OURS = "minitron_recipes"
GPT_PROVIDER = "megatron.bridge.models.gpt_provider.GPTModelProvider"
# Bridge's layer-spec functions (megatron/bridge/models/gpt_provider.py)
BRIDGE_SPECS = {"local": "megatron.bridge.models.gpt_provider.local_layer_spec",
                "te": "megatron.bridge.models.gpt_provider.transformer_engine_layer_spec"}
# CUDA-only kernels a local-spec model must not ask for (Bridge defaults some to on)
LOCAL_SPEC_OFF = ("masked_softmax_fusion", "bias_activation_fusion", "bias_dropout_fusion",
                  "apply_rope_fusion", "persist_layer_norm", "gradient_accumulation_fusion",
                  "cross_entropy_loss_fusion")


def iteration_dir(root: Path, iteration: int | str) -> Path:
    return Path(root) / ("release" if iteration == "release" else f"iter_{int(iteration):07d}")


def common_state(iteration: int) -> dict:
    """What Bridge and Megatron-LM expect beside the model in a checkpoint's common state."""
    return {"checkpoint_version": CHECKPOINT_VERSION, "iteration": int(iteration)}


# ---- writing -------------------------------------------------------------------------------
def run_config(arch: Arch, *, tp: int, pp: int, dtype: str, spec: str) -> dict:
    """Bridge's run_config.yaml for a checkpoint of `arch`: the GPT provider (what
    `load_megatron_model`, `export_ckpt` and `checkpoint.pretrained_checkpoint` instantiate)
    and the checkpoint section its training load reads. `spec` (local | te) is the layer spec
    the writing stage used; Bridge users may override `model.transformer_layer_spec`."""
    model = {
        "_target_": GPT_PROVIDER,
        "num_layers": arch.num_layers, "hidden_size": arch.hidden_size,
        "ffn_hidden_size": arch.ffn_hidden_size,
        "num_attention_heads": arch.num_attention_heads,
        "num_query_groups": arch.num_query_groups, "kv_channels": arch.head_dim,
        "vocab_size": arch.vocab_size, "should_pad_vocab": False,
        "make_vocab_size_divisible_by": 128,
        "share_embeddings_and_output_weights": arch.tie_embeddings,
        "normalization": "RMSNorm", "layernorm_epsilon": arch.norm_eps,
        "gated_linear_unit": True,
        "activation_func": {"_target_": "torch.nn.functional.silu", "_call_": False},
        "add_bias_linear": False, "add_qkv_bias": arch.qkv_bias, "qk_layernorm": arch.qk_norm,
        "position_embedding_type": "rope", "rotary_base": arch.rope_theta, "rotary_percent": 1.0,
        "rope_scaling": arch.rope_scaling_factor is not None,
        "rope_scaling_factor": arch.rope_scaling_factor or 8.0,
        "seq_length": arch.max_position_embeddings,
        "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
        "bf16": dtype == "bf16", "fp16": False,
        "params_dtype": {"_target_": TORCH_DTYPES[dtype], "_call_": False},
        "transformer_layer_spec": {"_target_": BRIDGE_SPECS[spec], "_call_": False},
    }
    if spec == "local":
        model.update({k: False for k in LOCAL_SPEC_OFF})
    model.update(megatron_moe(arch))
    if arch.moe_router_topk == 1:  # megatron's top-1 router must softmax over all experts
        model.update(moe_router_pre_softmax=True)  # (see model.py); ours keeps the truth
    return {"model": model,
            "checkpoint": {"ckpt_format": "torch_dist", "save_optim": False, "save_rng": False,
                           "fully_parallel_save": True},
            # ours, read back by arch_from_run_config (the GPT provider is family-neutral and
            # would refuse an unknown field)
            OURS: {"hf_model_type": arch.family, "sliding_window": arch.sliding_window,
                   **({"moe_norm_topk_prob": arch.moe_norm_topk_prob} if arch.is_moe else {})}}


def write_layout(root: Path, arch: Arch, iteration: int, *, tp: int, pp: int, dtype: str,
                 spec: str) -> None:
    """The tracker and run_config.yaml around the weights already in iteration_dir(root, it)."""
    it_dir = iteration_dir(root, iteration)
    if not (it_dir / "metadata.json").is_file():
        raise MissingInput(f"{it_dir} holds no checkpoint to describe")
    text = ("# Megatron-Bridge's view of this checkpoint, written by minitron-recipes from the "
            "stage's architecture\n" + yaml.safe_dump(
                run_config(arch, tp=tp, pp=pp, dtype=dtype, spec=spec), sort_keys=False))
    (it_dir / RUN_CONFIG).write_text(text)
    (Path(root) / TRACKER).write_text(f"{int(iteration)}\n")


# ---- reading -------------------------------------------------------------------------------
def read_tracker(root: Path) -> int | str:
    f = Path(root) / TRACKER
    text = f.read_text().strip()
    if text == "release":
        return text
    try:
        it = int(text)
    except ValueError:
        raise Refusal(f"{f} holds {text!r}, not an iteration number or 'release'; it is not "
                      "a Megatron-LM / Megatron-Bridge tracker file") from None
    if it < 0:
        raise Refusal(f"{f} holds a negative iteration {it}")
    return it


def weights_dir(folder: Path) -> Path:
    """The folder holding the megatron torch_dist files of a checkpoint root (ours, Bridge's or
    Megatron-LM's: the tracker's iteration), an iteration folder itself, or a stage folder
    written before this layout (<stage>/checkpoint)."""
    folder = Path(folder)
    if (folder / TRACKER).is_file():
        it = read_tracker(folder)
        d = iteration_dir(folder, it)
        if not (d / "metadata.json").is_file():
            raise MissingInput(
                f"{folder / TRACKER} names iteration {it}, but {d} holds no complete checkpoint "
                "(no metadata.json): the save was interrupted or the folder was moved; write the "
                "number of a complete iter_* folder into the tracker")
        return d
    if (folder / "metadata.json").is_file():
        return folder
    if (folder / "checkpoint" / "metadata.json").is_file():
        return folder / "checkpoint"
    raise MissingInput(
        f"{folder} holds no megatron checkpoint: neither a {TRACKER} tracker (a Megatron-LM / "
        "Megatron-Bridge checkpoint root, or a finished stage of ours) nor an iteration folder "
        "with metadata.json")


def read_run_config(path: Path) -> dict:
    try:
        return yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise Refusal(f"{path} is not valid YAML ({e})") from e


def arch_from_run_config(path: Path, cfg: dict | None = None) -> Arch:
    """Our Arch from a Bridge run_config.yaml's model section (`cfg`: the file, already read);
    what it cannot express is refused by name."""
    cfg = read_run_config(path) if cfg is None else cfg
    m = cfg.get("model") or {}
    ours = cfg.get(OURS) or {}

    def need(key):
        if m.get(key) is None:
            raise Refusal(f"{path}: model.{key} is missing; name the model's HF config.json "
                          "instead (the stage's *_hf_config key)")
        return m[key]

    bad = []
    experts = m.get("num_moe_experts")
    shared = m.get("moe_shared_expert_intermediate_size")
    if experts and m.get("moe_layer_freq", 1) != 1:
        bad.append("moe_layer_freq (dense layers between MoE layers)")
    if shared and not m.get("moe_shared_expert_gate"):
        bad.append("moe_shared_expert_gate=false (an ungated shared expert)")
    if m.get("normalization", "RMSNorm") != "RMSNorm":
        bad.append(f"normalization={m['normalization']}")
    if m.get("gated_linear_unit") is False:
        bad.append("gated_linear_unit=false")
    if m.get("add_bias_linear"):
        bad.append("add_bias_linear=true")
    if m.get("position_embedding_type", "rope") != "rope":
        bad.append(f"position_embedding_type={m['position_embedding_type']}")
    if m.get("multi_latent_attention"):
        bad.append("multi_latent_attention")
    act = m.get("activation_func")
    if isinstance(act, dict) and not str(act.get("_target_", "")).endswith(".silu"):
        bad.append(f"activation_func={act.get('_target_')}")
    if bad:
        raise Refusal(f"{path}: {', '.join(bad)}: not a SwiGLU/RMSNorm/RoPE decoder of "
                      f"the families this recipe supports ({', '.join(FAMILIES)})")
    heads = need("num_attention_heads")
    window = m.get("window_size")
    family = ours.get("hf_model_type") or (
        ("qwen2_moe" if shared else "qwen3_moe" if m.get("qk_layernorm") else "mixtral")
        if experts else
        "qwen3" if m.get("qk_layernorm") else "qwen2" if m.get("add_qkv_bias") else
        "mistral" if "mistral" in str(m.get("_target_", "")).lower() else "llama")
    if family not in FAMILIES:
        raise Refusal(f"{path}: {OURS}.hf_model_type={family!r} is not one of "
                      f"{list(FAMILIES)}")
    return Arch(
        num_layers=need("num_layers"), hidden_size=need("hidden_size"),
        ffn_hidden_size=need("ffn_hidden_size"), num_attention_heads=heads,
        num_query_groups=m.get("num_query_groups") or heads,
        head_dim=m.get("kv_channels") or m["hidden_size"] // heads,
        vocab_size=need("vocab_size"),
        tie_embeddings=bool(m.get("share_embeddings_and_output_weights", True)),
        rope_theta=float(m.get("rotary_base", 10000)),
        rope_scaling_factor=float(m.get("rope_scaling_factor", 8.0))
        if m.get("rope_scaling") else None,
        norm_eps=float(m.get("layernorm_epsilon", 1e-5)),
        max_position_embeddings=int(m.get("max_position_embeddings") or m.get("seq_length")
                                    or 4096),
        family=family, qkv_bias=bool(m.get("add_qkv_bias")), qk_norm=bool(m.get("qk_layernorm")),
        sliding_window=ours.get("sliding_window") or (
            int(window[0]) if window and window[0] not in (None, -1) else None),
        **({} if not experts else dict(
            num_moe_experts=int(experts), moe_ffn_hidden_size=int(need("moe_ffn_hidden_size")),
            moe_router_topk=int(m.get("moe_router_topk", 2)),
            moe_norm_topk_prob=bool(ours.get("moe_norm_topk_prob",
                                             not m.get("moe_router_pre_softmax", False))),
            moe_shared_expert_intermediate_size=int(shared) if shared else None)))


TOKENIZER_NAMES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclasses.dataclass
class Source:
    """A megatron checkpoint a stage reads: one of our stage folders or a Megatron-Bridge /
    Megatron-LM checkpoint."""
    path: Path
    kind: str                 # "stage" | "megatron-bridge" | "megatron-lm"
    arch: Arch
    weights: Path             # the folder checkpoint.load reads
    hf_config: dict           # the HF config an export starts from
    tokenizer: Path | None    # folder with the tokenizer files, when there is one
    manifest: dict | None     # ours only

    def input(self):
        """What StageDir signs and checks for overlap: our folder (its manifest), or the
        foreign folder with every file of the checkpoint it read (sizes and mtimes)."""
        if self.manifest is not None:
            return self.path
        files = [self.path / TRACKER, *sorted(p for p in self.weights.iterdir() if p.is_file())]
        return [self.path, *(f for f in files if f.is_file())]

    def provenance(self) -> dict:
        out = {"path": str(self.path.resolve()), "kind": self.kind}
        if self.manifest is not None:
            out["manifest_fingerprint"] = self.manifest["fingerprint"]
        else:
            out["weights"] = str(self.weights.resolve())
        return out


def open_source(path: str | Path, key: str, stages: tuple[str, ...],
                hf_config: str | None = None) -> Source:
    """The checkpoint `key` names: our stage folder (one of `stages`), or a Megatron-Bridge /
    Megatron-LM one (architecture from run_config.yaml, else from `hf_config`). Every error
    names the key and the fix; nothing is loaded."""
    path = Path(path)
    if not path.is_dir():
        raise MissingInput(f"{key}={path} does not exist or is not a folder")
    if (path / "manifest.json").is_file():
        m = read_manifest(path, stages, key)
        if "arch" not in m:
            raise MissingKey(f"{key}={path}: its manifest.json has no 'arch'")
        weights = weights_dir(path)
        integrity.refuse_damaged(weights, checksums=False)  # a short copy, before any work
        return Source(path, "stage", Arch.from_dict(m["arch"]), weights,
                      json.loads((path / "hf_config.json").read_text()), path / "tokenizer", m)
    try:
        weights = weights_dir(path)
    except FileNotFoundError as e:
        raise MissingInput(f"{key}: {e}; {key} takes a finished stage of ours "
                           f"(e.g. <run.dir>/{stages[0]}) or such a checkpoint") from None
    rc = weights / RUN_CONFIG
    base, tok = {}, None
    if hf_config:
        hf = Path(hf_config)
        hf_dir = hf if hf.is_dir() else hf.parent
        base = read_hf_config(hf_dir) if hf.is_dir() else json.loads(hf.read_text())
        arch = Arch.from_hf_config(base, str(hf))
        if any((hf_dir / n).is_file() for n in TOKENIZER_NAMES):
            tok = hf_dir
    elif rc.is_file():
        run_cfg = read_run_config(rc)
        arch = arch_from_run_config(rc, run_cfg)
        # Bridge records the HF model it imported: where that is a local folder, its config
        # supplies what the architecture does not (token ids, ...)
        origin = (run_cfg.get("model") or {}).get("hf_model_id")
        if origin and (Path(origin) / "config.json").is_file():
            base = read_hf_config(origin)
    else:
        raise MissingInput(
            f"{key}={path} is a megatron checkpoint without {RUN_CONFIG} (Megatron-LM writes "
            f"none): name its architecture with {key}_hf_config=<the model's HF config.json or "
            "HF folder>")
    if tok is None and any((weights / "tokenizer" / n).is_file() for n in TOKENIZER_NAMES):
        tok = weights / "tokenizer"  # Bridge's save_tokenizer_assets
    return Source(path, "megatron-bridge" if rc.is_file() else "megatron-lm", arch, weights,
                  arch.to_hf_config(base), tok, None)
