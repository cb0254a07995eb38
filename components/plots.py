"""Evaluation figures: confusion heatmap, per-class IoU bars, colour-coded prediction overlays.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot global state, no display needed);
every file is written atomically.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from components.labels import colorize
from components.storage import atomic_path


def save_confusion_matrix(
    matrix: np.ndarray, class_names: Sequence[str], path: Path, title: str = ""
) -> Path:
    """Row-normalised heatmap (each row: where that ground-truth class's pixels went)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    size = 3 + 0.45 * len(class_names)
    fig, ax = _figure(size, size)
    image = ax.imshow(normalised, cmap="viridis", vmin=0.0, vmax=1.0)
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, labels=class_names, rotation=90)
    ax.set_yticks(ticks, labels=class_names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(title or "confusion matrix (row-normalised)")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)


def save_per_class_iou(per_class_iou: Mapping[str, float], path: Path, title: str = "") -> Path:
    """Horizontal bars of IoU per class; classes absent from the ground truth (NaN) are marked n/a."""
    names = list(per_class_iou)
    values = [0.0 if math.isnan(v) else v for v in per_class_iou.values()]
    fig, ax = _figure(7, 1 + 0.35 * len(names))
    bars = ax.barh(names, values, color="tab:blue")
    for bar, iou in zip(bars, per_class_iou.values(), strict=True):
        label = "n/a" if math.isnan(iou) else f"{iou:.3f}"
        ax.text(bar.get_width() + 0.01, bar.get_y() + bar.get_height() / 2, label, va="center", fontsize=8)
    ax.set_xlim(0, 1.1)
    ax.invert_yaxis()
    ax.set_xlabel("IoU")
    ax.set_title(title or "per-class IoU")
    return _save(fig, path)


def save_overlay(image_rgb: np.ndarray, ground_truth: np.ndarray, prediction: np.ndarray, path: Path) -> Path:
    """image | ground truth | prediction side by side, labels blended over the image (trainIds)."""
    panels = [image_rgb]
    for train_ids in (ground_truth, prediction):
        colours = colorize(train_ids)
        panels.append(cv2.addWeighted(image_rgb, 0.4, colours, 0.6, 0.0))
    strip = np.concatenate(panels, axis=1)
    ok, png = cv2.imencode(".png", cv2.cvtColor(strip, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"cannot encode the overlay for {path}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(png.tobytes())
    return path


def _figure(width: float, height: float) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Any, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return path
