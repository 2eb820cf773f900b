"""A trained model's pictures: learning curves, the confusion matrix and the reliability diagram, as PNG files.

Drawn with matplotlib's Agg renderer on bare figures (:mod:`simpsons_ray.core.figures`),
and written through storage beside the artifact.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from simpsons_ray.core.figures import new_figure, save_figure


def training_curves(history: list[dict], uri: str) -> None:
    """Loss and accuracy per epoch, train beside validation, phases marked."""
    frame = pd.DataFrame(history)
    fig = new_figure(1000, 400)
    loss_ax, acc_ax = fig.subplots(1, 2)
    for ax, metric, title in ((loss_ax, "loss", "Loss"), (acc_ax, "accuracy", "Accuracy")):
        if not frame.empty:
            ax.plot(frame["epoch"], frame[f"train_{metric}"], marker="o", label="train")
            ax.plot(frame["epoch"], frame[f"val_{metric}"], marker="o", label="validation")
            # A dotted line where fine-tuning starts.
            changes = frame.index[frame["phase"] != frame["phase"].shift()][1:]
            for i in changes:
                ax.axvline(frame.loc[i, "epoch"] - 0.5, color="grey", linestyle=":")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    save_figure(fig, uri)


def confusion_matrix(matrix: np.ndarray, classes: list[str], uri: str, title: str = "") -> None:
    """Row-normalised confusion matrix (true rows, predicted columns) with counts."""
    n = len(classes)
    side = max(500, 40 * n + 250)
    fig = new_figure(side, side)
    ax = fig.subplots()
    if title:
        ax.set_title(title)
    rows = np.asarray(matrix, dtype=np.float64)
    share = rows / np.maximum(rows.sum(axis=1, keepdims=True), 1)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=90, fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if matrix[i][j]:
                    ax.text(j, i, str(int(matrix[i][j])), ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")
    save_figure(fig, uri)


RELIABILITY_PX = (1000, 500)


def reliability_diagram(curves: dict, uri: str) -> None:
    """Accuracy against top-1 confidence per bin, one line per curve (``calibration.Reliability``), plus bin counts.

    A calibrated model lies on the diagonal; the legend gives each curve's ECE.
    """
    fig = new_figure(*RELIABILITY_PX)
    ax, counts = fig.subplots(1, 2)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for name, rel in curves.items():
        used = rel.count > 0
        ax.plot(rel.confidence[used], rel.accuracy[used], marker="o", markersize=4, label=f"{name} (ECE {rel.ece:.3f})")
        centers = (rel.edges[:-1] + rel.edges[1:]) / 2
        counts.plot(centers, rel.count, marker=".", label=name)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 probability)", ylabel="accuracy", title="Reliability")
    ax.legend(fontsize=8, loc="upper left")
    counts.set(xlim=(0, 1), xlabel="confidence (top-1 probability)", ylabel="images per bin", title="Confidence histogram")
    counts.legend(fontsize=8, loc="upper left")
    save_figure(fig, uri)
