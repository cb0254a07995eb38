"""Evaluation: our confusion-matrix scoring vs cityscapesscripts' ``evalPixelLevelSemanticLabeling``.

Both score the same predictions of the val split: ours reads them as trainId PNGs
(``components.evaluate.score_predictions``), the reference as the labelId PNGs the official evaluator
expects (the same pixels through cityscapesscripts' trainId -> labelId table), against
``*_gtFine_labelIds.png``. Ours reads the ground truth from the dataset's label cache, which its first
scoring builds: that first scoring is timed on its own and reported in the notes.

The reference's instance-level score (iIoU) is off: we do not compute it, and its code calls
``np.in1d``, which NumPy 2.4 removed. The pip package ships no compiled Cython helper, so the reference
builds its confusion matrix in Python (``np.unique``), as anyone running it gets. Both quiet, no JSON
file. Every class and category IoU must agree to 1e-6.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.common import Row, make_row, side_by_side
from components.data.cache import CACHE_DIR
from components.data.layout import LABEL_SUFFIX
from components.evaluate import score_predictions
from components.labels import CLASS_NAMES, IGNORE_INDEX, trainid_to_labelid_lut

TARGET = (">=", 20.0)
TOLERANCE = 1e-6


def bench_evaluation(root: Path, work_dir: Path, *, repeats: int = 3) -> Row:
    """images/s, ours vs the official evaluator, on perturbed ground truth as the predictions."""
    trainid_dir, labelid_dir = Path(work_dir) / "trainids", Path(work_dir) / "labelids"
    ground_truth = sorted(Path(root, "gtFine", "val").glob(f"*/*{LABEL_SUFFIX}"))
    reference_pairs = _write_predictions(ground_truth, trainid_dir, labelid_dir)
    results: dict[str, Any] = {}

    def ours() -> None:
        results["ours"] = score_predictions(trainid_dir, root, "val")

    def reference() -> None:
        results["reference"] = _run_cityscapesscripts(reference_pairs)

    for stale in Path(root, CACHE_DIR).glob("val_labels_*"):
        stale.unlink()
    start = time.perf_counter()
    ours()  # the first scoring decodes the ground truth into the label cache
    first_s = time.perf_counter() - start
    ours_s, reference_s = side_by_side(ours, reference, repeats)
    worst = _worst_difference(results["ours"], results["reference"])
    count = len(ground_truth)
    return make_row(
        "evaluation, class IoU from PNGs",
        "images/s",
        count / ours_s,
        count / reference_s,
        worst <= TOLERANCE,
        TARGET,
        f"ground truth from the label cache; first scoring incl. building it {count / first_s:.0f} "
        f"images/s ({reference_s / first_s:.1f}x); {count} frames, "
        f"max |IoU diff| {worst:.1e} over classes+categories, median of {repeats}",
    )


def _write_predictions(
    ground_truth: list[Path], trainid_dir: Path, labelid_dir: Path
) -> list[tuple[str, str]]:
    """Predictions = ground truth with wrong-class and unlabelled blocks; returns the reference's pairs."""
    for directory in (trainid_dir, labelid_dir):
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
    lut = trainid_to_labelid_lut()
    pairs = []
    for index, gt_path in enumerate(ground_truth):
        pred = _perturb(cv2.imread(str(gt_path), cv2.IMREAD_UNCHANGED), np.random.default_rng(index))
        stem = gt_path.name[: -len(LABEL_SUFFIX)]
        cv2.imwrite(str(trainid_dir / f"{stem}_pred.png"), pred)
        labelid_path = labelid_dir / f"{stem}_pred_labelIds.png"
        cv2.imwrite(str(labelid_path), lut[pred])
        gt_labelids = str(gt_path).replace("_labelTrainIds.png", "_labelIds.png")
        pairs.append((str(labelid_path), gt_labelids))
    os.sync()  # the kernel's writeback of these files must not land inside the timed runs
    return pairs


def _perturb(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible prediction: ignore pixels get a class, random blocks get another class or none."""
    pred = np.where(label == IGNORE_INDEX, rng.integers(0, len(CLASS_NAMES)), label).astype(np.uint8)
    height, width = pred.shape
    for _ in range(40):
        y, x = rng.integers(0, height), rng.integers(0, width)
        h, w = rng.integers(height // 40 + 1, height // 6 + 2), rng.integers(width // 40 + 1, width // 6 + 2)
        value = IGNORE_INDEX if rng.random() < 0.15 else rng.integers(0, len(CLASS_NAMES))
        pred[y : y + h, x : x + w] = value
    return pred


def _run_cityscapesscripts(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official

    args = copy.copy(official.args)
    args.evalInstLevelScore = False
    args.evalPixelAccuracy = False
    args.JSONOutput = False
    args.quiet = True
    predictions, ground_truth = (list(files) for files in zip(*pairs, strict=True))
    with contextlib.redirect_stdout(io.StringIO()):
        return official.evaluateImgLists(predictions, ground_truth, args)


def _worst_difference(ours: dict[str, Any], reference: dict[str, Any]) -> float:
    """Largest |IoU difference| over classes and categories; inf if one side is NaN and not the other."""
    pairs = [(ours["per_class_iou"][name], reference["classScores"][name]) for name in CLASS_NAMES]
    pairs += [(iou, reference["categoryScores"][name]) for name, iou in ours["category_iou"].items()]
    worst = 0.0
    for mine, theirs in pairs:
        if math.isnan(mine) or math.isnan(theirs):
            if not (math.isnan(mine) and math.isnan(theirs)):
                return math.inf
            continue
        worst = max(worst, abs(mine - theirs))
    return worst
