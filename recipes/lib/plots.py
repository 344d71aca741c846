"""The report's plots (matplotlib, Agg): training curves, importance, depth candidates, the
search's candidates and the evaluation. Imported by recipes/report.py when it renders."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_training(rows: list[dict], path: Path, baseline: list[dict] | None = None) -> None:
    """KD and LM loss curves of the distillation; `baseline`: the cross-entropy-trained
    student's LM loss on the same axis."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "kd_loss", "KD loss: KL(teacher || student)"),
                           (axes[1], "lm_loss", "student LM loss (cross-entropy)")):
        tr = [(r["tokens"] / 1e3, r[key]) for r in rows if key in r]
        va = [(r["tokens"] / 1e3, r[f"valid_{key}"]) for r in rows if f"valid_{key}" in r]
        if tr:
            ax.plot(*zip(*tr), label="train", lw=1.2)
        if va:
            ax.plot(*zip(*va), "o-", label="validation", ms=4)
        base = [(r["tokens"] / 1e3, r[f"valid_{key}"]) for r in baseline or []
                if f"valid_{key}" in r]
        if base:
            ax.plot(*zip(*base), "s--", label="validation, ce_trained", ms=4)
        ax.set(title=title, xlabel="training tokens (thousands)", ylabel="loss (nats / token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_importance(imp: dict, student: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    heads = [imp["heads"][k] for k in sorted(imp["heads"], key=int)]
    if heads:
        im = axes[0].imshow(list(zip(*heads)), aspect="auto", cmap="viridis")
        fig.colorbar(im, ax=axes[0], label="L2 of mean |activation|")
        axes[0].set(title="attention-head importance", xlabel="layer (0-indexed, HF numbering)",
                    ylabel="query head")
    experts = [imp["experts"][k] for k in sorted(imp.get("experts") or {}, key=int)]
    q = [] if experts else [imp["neurons_quantiles"][k]
                            for k in sorted(imp["neurons_quantiles"], key=int)]
    if experts:  # a mixture of experts: what expert pruning ranks, per layer
        im = axes[1].imshow(list(zip(*experts)), aspect="auto", cmap="viridis")
        fig.colorbar(im, ax=axes[1], label="mean L2 of the routed output")
        axes[1].set(title="expert importance", xlabel="layer (0-indexed, HF numbering)",
                    ylabel="expert")
        axes[1].yaxis.set_major_locator(MaxNLocator(integer=True))
    if q:
        layers = range(len(q))
        axes[1].fill_between(layers, [x[1] for x in q], [x[3] for x in q], alpha=0.3,
                             label="25-75 %")
        axes[1].plot(layers, [x[2] for x in q], label="median")
        axes[1].plot(layers, [x[4] for x in q], "--", lw=0.8, label="max")
        axes[1].set(title="MLP neuron importance per layer", xlabel="layer (0-indexed)",
                    ylabel="L2 of mean |activation| (log)", yscale="log")
        axes[1].legend()
    if imp.get("channels"):
        ch = sorted(imp["channels"], reverse=True)
        axes[2].plot(range(1, len(ch) + 1), ch)
        axes[2].axvline(student["hidden_size"], color="red", ls="--",
                        label=f"kept: {student['hidden_size']}")
        axes[2].set(title="embedding-channel importance (sorted)", xlabel="channel rank",
                    ylabel="summed L2 over norms")
        axes[2].legend()
    for ax in axes[1:]:
        ax.grid(alpha=0.3)
    for ax in axes:  # layers, heads and ranks are whole numbers
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_depth(cands: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{c['drop_layers'][0]}-{c['drop_layers'][1]}" for c in cands]
    losses = [c["loss"] for c in cands]
    best = losses.index(min(losses))
    ax.bar(labels, losses, color=["C2" if i == best else "C0" for i in range(len(labels))])
    ax.set(title="teacher held-out loss with a contiguous block removed",
           xlabel="dropped block (1-indexed layers)", ylabel="loss (nats / token)")
    ax.tick_params(axis="x", rotation=90)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_search(res: dict, path: Path) -> None:
    cands = res["candidates"]
    score = (res.get("settings") or {}).get("score", "kd_loss")
    key = f"tournament_{score}" if res["decided_by"] == "tournament" else "zero_shot_lm_loss"
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for c in cands:
        ax.scatter(c["params"] / 1e6, c[key], s=80 if c["winner"] else 30,
                   color="C2" if c["winner"] else "C0", zorder=3)
        ax.annotate(f"c{c['candidate']}", (c["params"] / 1e6, c[key]),
                    textcoords="offset points", xytext=(5, 3))
    ax.set(title=f"search candidates ({res['decided_by']}; winner green)",
           xlabel="parameters (M)",
           ylabel={"kd_loss": "held-out KD loss", "lm_loss": "held-out LM loss",
                   "lm_eval": "lm-eval score"}[score] + " after the tournament"
           if key.startswith("tournament") else "zero-shot held-out LM loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_evaluation(heldout: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(heldout)
    ppl = [heldout[n]["perplexity"] for n in names]
    bars = ax.bar(names, ppl, color=[f"C{i}" for i in range(len(names))])
    ax.bar_label(bars, fmt="%.1f")
    ax.set(title="held-out perplexity (test split, lower is better)", ylabel="perplexity (log)",
           yscale="log", ylim=(min(ppl) / 1.5, max(ppl) * 2))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
