"""Figures: training curves and the confusion matrix (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

import io
import os
from typing import Sequence

from vggnet.base.files import atomic_write_bytes


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_curves(records: Sequence[dict], path: str | os.PathLike, title: str = "") -> None:
    """Loss and accuracy per epoch: train, validation (when the run holds one out) and test. The accuracy panel
    marks the final test accuracy (and the best validation accuracy: what selects the best checkpoint)."""
    plt = _figure()
    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    splits = [("train", "o-"), ("val", "^-"), ("test", "s-")]
    for split, style in splits:
        if f"{split}_loss" in records[-1]:
            ax_loss.plot(epochs, [r[f"{split}_loss"] for r in records], style, label=split)
            ax_acc.plot(epochs, [100 * r[f"{split}_acc"] for r in records], style, label=split)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    final = records[-1]
    ax_acc.annotate(f"test {100 * final['test_acc']:.2f}%", (final["epoch"], 100 * final["test_acc"]),
                    textcoords="offset points", xytext=(0, -14), ha="center")
    if "val_acc" in final:
        best = max(records, key=lambda r: r["val_acc"])
        ax_acc.annotate(f"best val {100 * best['val_acc']:.2f}%", (best["epoch"], 100 * best["val_acc"]),
                        textcoords="offset points", xytext=(0, 8), ha="center")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    _save(fig, path)
    plt.close(fig)


def plot_confusion(confusion: Sequence[Sequence[int]], classes: Sequence[str], path: str | os.PathLike,
                   title: str = "") -> None:
    """Row-normalised confusion matrix (rows: true class, columns: predicted), counts in the cells."""
    import numpy as np

    plt = _figure()
    counts = np.asarray(confusion, dtype=np.int64)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=float), where=rows > 0)
    k = len(classes)
    size = max(5.0, 0.45 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if k <= 30:
        ax.set_xticks(range(k), labels=classes, rotation=60, ha="right")
        ax.set_yticks(range(k), labels=classes)
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    _save(fig, path)
    plt.close(fig)
