"""The report's figures: learning curves, gain heatmaps, the features against the raw inputs,
and the transferability scores against the measured gains.

Each function draws one PNG from the comparison tables (or one target's arrays) and writes it
atomically, byte-for-byte reproducibly (no timestamp or software tag in the file).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import TwoSlopeNorm

from tasks.analysis.statistics import HELPS, HURTS
from tasks.data.datasets import Labelled
from tasks.workspace import files

MARK = {HELPS: "▲", HURTS: "▼"}  # drawn beside significant gains and losses


def _save(fig: plt.Figure, path: Path) -> None:
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)


def learning_curves(table: pd.DataFrame, target: str, path: Path) -> None:
    """Test accuracy against labels (log x), one line per arm (a source's strategy, or
    scratch), its 95% interval as a band."""
    rows = table[table.target == target]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name, curve in rows.groupby("arm", sort=False):
        curve = curve.sort_values("n_labels")
        (line,) = ax.plot(curve.n_labels, curve.test_acc_mean, marker="o", label=name)
        ax.fill_between(
            curve.n_labels,
            curve.test_acc_ci_low,
            curve.test_acc_ci_high,
            color=line.get_color(),
            alpha=0.15,
            linewidth=0,
        )
    ax.set_xscale("log")
    ax.set_xlabel("labelled training examples (log scale)")
    ax.set_ylabel("test accuracy (mean, 95% t-interval)")
    ax.set_title(f"{target}: learning curves")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    fig.tight_layout()
    _save(fig, path)


def gain_heatmap(table: pd.DataFrame, target: str, path: Path) -> None:
    """Paired gain over scratch in points, transfer arm x label budget (fewest labels first);
    ▲/▼ where the 95% interval excludes zero."""
    rows = table[(table.target == target) & (table.strategy != "scratch")]
    gains = rows.pivot(index="arm", columns="budget", values="gain_pts")
    verdicts = rows.pivot(index="arm", columns="budget", values="verdict")
    order = list(dict.fromkeys(rows.arm))
    budgets = list(dict.fromkeys(rows.sort_values("n_labels", kind="stable").budget))
    gains, verdicts = gains.loc[order, budgets], verdicts.loc[order, budgets]
    limit = max(float(np.nanmax(np.abs(gains.to_numpy()))), 1.0)
    fig, ax = plt.subplots(
        figsize=(1.2 * gains.shape[1] + 2.5, 0.6 * gains.shape[0] + 1.6), dpi=120
    )
    image = ax.imshow(
        gains.to_numpy(), cmap="RdBu", norm=TwoSlopeNorm(0, vmin=-limit, vmax=limit), aspect="auto"
    )
    for i, strategy in enumerate(gains.index):
        for j, budget in enumerate(gains.columns):
            gain, mark = gains.loc[strategy, budget], MARK.get(verdicts.loc[strategy, budget], "")
            ax.text(
                j,
                i,
                f"{gain:+.1f}{mark}",
                ha="center",
                va="center",
                fontsize=9,
                color="white" if abs(gain) > 0.6 * limit else "black",
            )
    labels = rows.drop_duplicates("budget").set_index("budget").n_labels
    ax.set_xticks(range(gains.shape[1]), [f"{b}\n({labels[b]})" for b in gains.columns])
    ax.set_yticks(range(gains.shape[0]), gains.index)
    ax.set_xlabel("label budget (labels)")
    ax.set_title(f"{target}: gain over scratch, points")
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    _save(fig, path)


def scores_vs_gain(
    sources: pd.DataFrame, scores: pd.DataFrame, agreement: pd.DataFrame, path: Path
) -> None:
    """One panel per transferability score: each (source, target) pair's mean score against its
    measured AULC gain, a marker per target, with Kendall's tau in the title."""
    pairs = sources.merge(scores, on=["target", "source"], validate="1:1")
    taus = agreement.set_index("score")
    names = list(taus.index)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), dpi=120)
    for ax, score in zip(np.atleast_1d(axes), names, strict=True):
        for i, (target, points) in enumerate(pairs.groupby("target", sort=False)):
            marker = "osD^v<>ph*"[i % 10]
            ax.scatter(points[score], points.aulc_gain_pts, marker=marker, label=target)
            for row in points.itertuples():
                ax.annotate(row.source, (getattr(row, score), row.aulc_gain_pts), fontsize=7)
        tau = taus.loc[score]
        shown = f"tau {tau.kendall_tau:+.2f}" if not np.isnan(tau.kendall_tau) else "no score"
        ax.set_title(f"{score}: {shown}")
        ax.set_xlabel(f"{score} (mean over budgets and seeds)")
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("AULC gain over scratch, points")
    np.atleast_1d(axes)[0].legend(fontsize="small")
    fig.tight_layout()
    _save(fig, path)


def _pca_2d(x: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, 2): projections on the two leading principal axes."""
    centred = x - x.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


def feature_map(
    raw: Labelled, features: Labelled, classes: list[int], target: str, path: Path
) -> None:
    """2-D PCA of the raw inputs beside 2-D PCA of the frozen backbone's features, by class."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), dpi=120)
    panels = [
        ("raw inputs", raw.x.reshape(len(raw), -1), raw.y),
        ("pretrained features", features.x, features.y),
    ]
    for ax, (title, x, y) in zip(axes, panels, strict=True):
        points = _pca_2d(x.astype(np.float64))
        for index, label in enumerate(classes):
            chosen = y == index
            ax.scatter(points[chosen, 0], points[chosen, 1], s=6, alpha=0.6, label=str(label))
        ax.set_title(f"{title} (PCA)")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[1].legend(title="class", markerscale=2, fontsize=8, loc="best")
    fig.suptitle(f"{target}: validation examples")
    fig.tight_layout()
    _save(fig, path)
