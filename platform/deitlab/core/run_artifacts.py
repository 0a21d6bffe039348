"""The files every run leaves in MLflow besides its metrics: training curves and the confusion matrix (PNG + JSON),
and its best weights as a deitlab model file. torch + matplotlib only; the MLflow adapter uploads them."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HISTORY_FILE = "history.json"  # written into every checkpoint by rank 0: the driver reads it without state.pt
CONFUSION_FILE = "confusion.json"

CURVE_PANELS = (
    ("loss", ("train_loss", "train_base_loss", "train_kd_loss", "val_loss")),
    ("accuracy", ("acc_cls", "acc_dist", "acc_fused", "acc_teacher", "agreement")),
    ("learning rate", ("lr",)),
    ("throughput (img/s)", ("train_images_per_s",)),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on workers and CI
    import matplotlib.pyplot as plt

    return plt


def write_checkpoint_extras(directory: str | Path, history: list[dict[str, float]],
                            confusion: list[list[int]] | None) -> tuple[str, ...]:
    """history.json (+ confusion.json) beside a checkpoint's state; returns the names written."""
    directory = Path(directory)
    (directory / HISTORY_FILE).write_text(json.dumps(history), encoding="utf-8")
    if confusion is None:
        return (HISTORY_FILE,)
    (directory / CONFUSION_FILE).write_text(json.dumps(confusion), encoding="utf-8")
    return HISTORY_FILE, CONFUSION_FILE


def curves_png(history: list[dict[str, float]], path: str | Path, title: str) -> Path | None:
    """Per-epoch curves, one panel per quantity; None when there is no epoch to draw."""
    if not history:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    epochs = [m["epoch"] for m in history]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (label, keys) in zip(axes.flat, CURVE_PANELS):
        for key in keys:
            values = [m.get(key) for m in history]
            if any(v is not None for v in values):
                ax.plot(epochs, [float("nan") if v is None else v for v in values], marker="o", ms=3, label=key)
        ax.set_title(label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(keys) > 1 and ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def confusion_png(matrix: list[list[int]], path: str | Path, title: str,
                  class_names: list[str] | None = None) -> Path:
    """The confusion matrix as a heat map with counts (rows: true class, columns: predicted)."""
    plt = _pyplot()
    n = len(matrix)
    names = class_names or [str(i) for i in range(n)]
    size = min(4 + 0.45 * n, 16)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    if n <= 30:  # beyond that the numbers are unreadable; the JSON has them
        peak = max(max(row) for row in matrix) or 1
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                ax.text(j, i, str(value), ha="center", va="center", fontsize=8,
                        color="white" if value > peak / 2 else "black")
        ax.set_xticks(range(n), names, rotation=90 if n > 10 else 0)
        ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def per_class_accuracy(matrix: list[list[int]]) -> list[float | None]:
    return [row[i] / sum(row) if sum(row) else None for i, row in enumerate(matrix)]


def confusion_json(matrix: list[list[int]], head: str) -> dict[str, Any]:
    return {"head": head, "rows": "true class", "columns": "predicted class", "matrix": matrix,
            "per_class_accuracy": per_class_accuracy(matrix)}
