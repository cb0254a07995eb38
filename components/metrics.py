"""Cityscapes pixel-level metrics, numerically identical to cityscapesscripts' evaluator.

The official ``evalPixelLevelSemanticLabeling`` works on labelIds; for a pixel whose ground truth is
an evaluated class it counts
  * class IoU = TP / (TP + FP + FN), where FN includes pixels predicted as any non-evaluated label and
    FP only counts pixels whose ground truth is evaluated; NaN when TP + FP + FN = 0 (class neither in
    the ground truth nor predicted), and NaN scores are left out of the mean;
  * category IoU the same way with all classes of a category merged.
Here the same counts come from a trainId confusion matrix with one extra column, "no prediction", for
predictions outside ``[0, num_classes)`` (the zero-shot baseline's unmapped VOC classes, ignore values).
Ground truth outside ``[0, num_classes)`` (255 = ignore) is not counted at all.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np
import torch
import torch.distributed as dist

from components.labels import CATEGORIES, CLASS_NAMES


class ConfusionMatrix:
    """Counts accumulated on ``device`` with one ``bincount`` per update; rows = ground truth."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        # (C+1) x (C+1): the last row collects ignored ground truth, the last column "no prediction".
        self.counts = torch.zeros(num_classes + 1, num_classes + 1, dtype=torch.int64, device=device)

    @property
    def matrix(self) -> torch.Tensor:
        """[C, C] int64: ``matrix[gt, pred]`` pixel counts over valid ground truth."""
        return self.counts[: self.num_classes, : self.num_classes]

    @property
    def no_prediction(self) -> torch.Tensor:
        """[C] int64: pixels of each ground-truth class predicted as something outside the classes."""
        return self.counts[: self.num_classes, self.num_classes]

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predicted and ground-truth trainIds (same shape; target 255 = ignore)."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        n = self.num_classes
        # Clamping folds every out-of-range value into the extra row/column in one bincount pass.
        index = target.to(self.counts.device, torch.int64).clamp(0, n) * (n + 1)
        index += pred.to(self.counts.device, torch.int64).clamp(0, n)
        self.counts += torch.bincount(index.flatten(), minlength=(n + 1) ** 2).view(n + 1, n + 1)

    def add_counts(self, counts: np.ndarray | torch.Tensor) -> None:
        """Add a (C+1)x(C+1) count array computed elsewhere (e.g. by :func:`confusion_counts`)."""
        self.counts += torch.as_tensor(counts, dtype=torch.int64, device=self.counts.device)

    def reduce(self) -> ConfusionMatrix:
        """Sum the counts over all ranks (no-op without an initialised process group)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.counts, op=dist.ReduceOp.SUM)
        return self

    def compute(self) -> dict[str, Any]:
        """Scores as cityscapesscripts defines them; per-class/category NaN = absent, left out of means."""
        counts = self.counts[: self.num_classes].double().cpu().numpy()
        matrix = counts[:, : self.num_classes]
        tp = np.diag(matrix)
        gt_pixels = counts.sum(axis=1)
        predicted = matrix.sum(axis=0)
        names = class_names(self.num_classes)
        per_class = dict(zip(names, _ratio(tp, gt_pixels + predicted - tp), strict=True))
        category_iou = {}
        if self.num_classes == len(CLASS_NAMES):  # categories exist for the Cityscapes label set only
            for category, ids in CATEGORIES.items():
                ids = list(ids)
                cat_tp = matrix[np.ix_(ids, ids)].sum()
                category_iou[category] = _ratio(cat_tp, gt_pixels[ids].sum() + predicted[ids].sum() - cat_tp)
        total = gt_pixels.sum()
        return {
            "miou": nanmean(per_class.values()),
            "per_class_iou": per_class,
            "pixel_accuracy": float(tp.sum() / total) if total else math.nan,
            "category_iou": category_iou,
            "mean_category_iou": nanmean(category_iou.values()),
        }


def confusion_counts(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """CPU twin of :meth:`ConfusionMatrix.update` for one image: (C+1)x(C+1) int64 counts.

    One 256x256 OpenCV ``calcHist`` of the raw uint8 values (~4x faster than ``np.bincount``, and
    without the GIL, so threads scale over images), folded into the extra row and column afterwards;
    its float32 bins are exact below 2**24 pixels per image.
    """
    if pred.size >= 2**24:
        raise ValueError(f"confusion_counts takes one image; got {pred.size} pixels")
    n = num_classes
    if n >= 256:
        raise ValueError(f"confusion_counts counts uint8 labels; {n} classes do not fit")
    planes = [ids if ids.dtype == np.uint8 else np.minimum(ids, n).astype(np.uint8) for ids in (target, pred)]
    histogram = cv2.calcHist(planes, [0, 1], None, [256, 256], [0, 256, 0, 256])
    # Folded in float32: every sum is a pixel count below 2**24, so still exact.
    rows = np.vstack([histogram[:n], histogram[n:].sum(axis=0, keepdims=True)])
    return np.hstack([rows[:, :n], rows[:, n:].sum(axis=1, keepdims=True)]).astype(np.int64)


def class_names(num_classes: int) -> tuple[str, ...]:
    """Cityscapes class names for the 19 trainIds, ``class_<i>`` for any other label set."""
    if num_classes == len(CLASS_NAMES):
        return CLASS_NAMES
    return tuple(f"class_{i}" for i in range(num_classes))


def nanmean(values: Any) -> float:
    """Mean over the non-NaN values (NaN if there are none), as cityscapesscripts' getScoreAverage."""
    valid = [v for v in values if not math.isnan(v)]
    return sum(valid) / len(valid) if valid else math.nan


def _ratio(numerator: Any, denominator: Any) -> Any:
    with np.errstate(invalid="ignore", divide="ignore"):
        result = np.where(denominator > 0, numerator / np.maximum(denominator, 1), np.nan)
    return result.tolist()
