"""PNG plots people read: a run's curves and the ablation study's curves side by side.

Every x axis is in epochs with whole-number ticks (per-step values are placed at
``step / steps_per_epoch``; epoch 0 is the randomly initialised model). The z-std panel starts at 0
and carries the healthy level ``1/√dim`` as a dashed reference (paper §4.1: z-std ≈ 1/√dim when
healthy, → 0 when the output collapses), so a collapse reads as a fall away from that line.
matplotlib draws off-screen (Agg); nothing here needs a display.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def steps_per_epoch(curve: Sequence[Sequence[float]], epochs: int) -> float | None:
    """Steps per epoch of a recorded curve ``[[step, loss, z_std], ...]`` that covers ``epochs``
    epochs (its last step over the epoch count); None when it cannot be told."""
    if not curve or epochs < 1:
        return None
    return curve[-1][0] / epochs


def _epoch_axis(ax, label: str = "epoch") -> None:
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(label)


def _x(curve, per_epoch: float | None) -> list[float]:
    return [row[0] / per_epoch for row in curve] if per_epoch else [row[0] for row in curve]


def _z_std_panel(ax, dim: int | None, legend_all: bool = True) -> None:
    ax.set_ylim(bottom=0)
    if dim:
        ref = ax.axhline(1 / math.sqrt(dim), ls="--", c="0.4", lw=0.9,
                         label=f"1/√dim = {1 / math.sqrt(dim):.4f} (healthy)")
        ax.set_ylim(top=max(ax.get_ylim()[1], 1.15 / math.sqrt(dim)))
        ax.legend(fontsize=7, loc="lower left", **({} if legend_all else {"handles": [ref]}))
    ax.set_title("z-std (collapse → 0)")


def plot_run(history: list[dict], curve: list[list[float]], path: str | Path, dim: int | None = None,
             per_epoch: float | None = None, warning_step: int | None = None) -> Path:
    """``curves.png`` of one run (:func:`run_figure`'s panels) written to ``path``; returns ``path``.

    Raises:
        pipeline.writes.WriteFailed: ``path`` could not be written (one line; the previous file intact).
    """
    return _save(run_figure(history, curve, dim, per_epoch, warning_step), path)


def plot_study(runs: dict[str, dict], path: str | Path, dim: int | None = None) -> Path:
    """The ablation study's PNG (:func:`study_figure`) written to ``path``; returns ``path``."""
    return _save(study_figure(runs, dim), path)


def _save(fig, path: str | Path) -> Path:
    """PNG of ``fig`` written whole or not at all (:func:`pipeline.writes.atomic_write`).

    Raises:
        pipeline.writes.WriteFailed: the file could not be written; the previous one is intact.
    """
    from pipeline.writes import atomic_write

    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), "plot")
    finally:
        _pyplot().close(fig)


def run_figure(history: list[dict], curve: list[list[float]], dim: int | None = None,
               per_epoch: float | None = None, warning_step: int | None = None):
    """A run's figure: loss and z-std per step, kNN / probe top-1 per epoch (three panels).

    Args:
        history: ``train.py``'s per-epoch records (``epoch`` 0 = random init, ``knn_top1``,
            ``probe_top1``, ``pixels_*`` on the first one).
        curve: ``[[step, loss, z_std], ...]``; ``per_epoch``: steps per epoch (default: from the
            curve and the history's last epoch), so the step panels share the epoch axis.
        dim: projector width, for the 1/√dim reference on the z-std panel.
        warning_step: step at which the collapse warning fired, drawn as a vertical line.
    """
    plt = _pyplot()
    epochs = max((h["epoch"] for h in history), default=0)
    per_epoch = per_epoch or steps_per_epoch(curve, epochs)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    if curve:
        x = _x(curve, per_epoch)
        axes[0].plot(x, [r[1] for r in curve], lw=0.8)
        axes[1].plot(x, [r[2] for r in curve], lw=0.8, label="z-std")
    axes[0].set_title("loss (−1 = both views agree)")
    _z_std_panel(axes[1], dim)
    if warning_step is not None:
        for ax in axes[:2]:
            ax.axvline(warning_step / per_epoch if per_epoch else warning_step, c="C3", lw=0.8, ls=":",
                       label="collapse warning")
        axes[1].legend(fontsize=7, loc="lower left")
    evals = [h for h in history if "knn_top1" in h]
    for key, label in (("knn_top1", "kNN top-1"), ("probe_top1", "linear probe top-1")):
        if any(key in h for h in evals):
            axes[2].plot([h["epoch"] for h in evals if key in h], [h[key] for h in evals if key in h], marker="o",
                         label=label)
    if evals and "pixels_knn_top1" in evals[0]:
        axes[2].axhline(evals[0]["pixels_knn_top1"], ls="--", c="C0", lw=0.8, label="kNN on raw pixels")
        axes[2].axhline(evals[0]["pixels_probe_top1"], ls="--", c="C1", lw=0.8, label="probe on raw pixels")
    axes[2].set_title("val accuracy (%)")
    if evals:
        axes[2].legend(fontsize=7)
    for ax in axes:
        _epoch_axis(ax, "epoch" if per_epoch or ax is axes[2] else "step")
    axes[2].set_xlabel("epoch (0 = random init)")
    fig.tight_layout()
    return fig


def study_figure(runs: dict[str, dict], dim: int | None = None):
    """A figure comparing variants: loss and z-std per step, kNN top-1 per epoch, one line each.

    Args:
        runs: ``{name: {"history": [...], "curve": [[step, loss, z_std], ...], "warning_step": int | None,
            "similarity": "cosine" | "cross-entropy"}}``; cross-entropy losses (≈ log dim, not in
            [−1, 1]) go on a right-hand axis, dashed.
        dim: projector width shared by the runs (1/√dim reference).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ce_axis = None
    for i, (name, run) in enumerate(runs.items()):
        colour = f"C{i % 10}"
        history, curve = run["history"], run["curve"]
        per_epoch = steps_per_epoch(curve, max((h["epoch"] for h in history), default=0))
        if curve:
            x = _x(curve, per_epoch)
            if run.get("similarity", "cosine") == "cosine":
                axes[0].plot(x, [r[1] for r in curve], lw=0.7, c=colour, label=name)
            else:
                ce_axis = ce_axis or axes[0].twinx()
                ce_axis.plot(x, [r[1] for r in curve], lw=0.7, c=colour, ls="--", label=name)
            axes[1].plot(x, [r[2] for r in curve], lw=0.7, c=colour, label=name)
        if run.get("warning_step") is not None and per_epoch:
            axes[1].plot([run["warning_step"] / per_epoch], [0], marker="v", c=colour, ms=7, clip_on=False)
        evals = [h for h in history if "knn_top1" in h]
        axes[2].plot([h["epoch"] for h in evals], [h["knn_top1"] for h in evals], marker="o", ms=3, c=colour, label=name)
    axes[0].set_title("loss (cosine: −1 = both views agree)")
    if ce_axis is not None:
        ce_axis.set_ylabel("cross-entropy loss (dashed)", fontsize=8)
    _z_std_panel(axes[1], dim, legend_all=False)  # the variants are named in the figure's legend
    axes[1].set_title("z-std (collapse → 0; ▼ = collapse warning)")
    axes[2].set_title("kNN top-1 on val (%)")
    for ax in axes:
        _epoch_axis(ax)
    axes[2].set_xlabel("epoch (0 = random init)")
    handles, labels = axes[2].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig
