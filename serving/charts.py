"""The confusion-matrix picture, drawn the same way for a training run's test split and a batch job's
output. Needs matplotlib (the `[train]` or `[report]` extra); nothing else imports it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def plot_confusion_matrix(cm: np.ndarray, classes: list[str], path: str | Path, title: str = "") -> None:
    n = len(classes)
    # Figure + Agg canvas rather than pyplot: no global figure state, so library callers can use it too.
    fig = Figure(figsize=(1.0 + 0.6 * n, 0.8 + 0.6 * n))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set(xlabel="predicted", ylabel="true")
    for i, j in zip(*np.nonzero(cm)):
        ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                color="white" if rates[i, j] > 0.5 else "black")
    ax.set_title(f"{title} accuracy {100 * np.trace(cm) / max(cm.sum(), 1):.2f}%".strip())
    fig.tight_layout()
    fig.savefig(path, dpi=100)
