"""ConfusionMatrix and score_predictions against cityscapesscripts' own evaluator, and under DDP."""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import Subset

from components.labels import CATEGORIES, CLASS_NAMES, NUM_CLASSES, trainid_to_labelid_lut
from components.metrics import ConfusionMatrix, confusion_counts


def _val_labels(root: Path) -> list[Path]:
    return sorted((root / "gtFine" / "val").glob("*/*_gtFine_labelTrainIds.png"))


def _predictions(case: str, gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if case == "random":
        # Every class (also ones absent from the ground truth) plus "no prediction" values.
        pred = rng.integers(0, NUM_CLASSES, gt.shape, dtype=np.uint8)
        pred[rng.random(gt.shape) < 0.1] = 255
        return pred
    pred = np.where(gt == 255, 0, gt).astype(np.uint8)  # perfect on every evaluated pixel
    if case == "absent-class":
        # The image's most common class gets "no prediction" (labelId 0 for the official evaluator).
        common = np.bincount(gt[gt < NUM_CLASSES].ravel()).argmax()
        pred[pred == common] = 255
    return pred


def _official_scores(pred_files: list[str], gt_files: list[str]) -> dict:
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official

    args = copy.copy(official.args)
    args.quiet = True
    args.JSONOutput = False
    args.evalInstLevelScore = False  # instance scores (nIoU) do not enter IoU; skipping saves time
    args.evalPixelAccuracy = False
    return official.evaluateImgLists(pred_files, gt_files, args)


@pytest.mark.parametrize("case", ["random", "perfect", "absent-class"])
def test_matches_official_evaluator(synthetic_root: Path, tmp_path: Path, case: str) -> None:
    from components.evaluate import score_predictions

    rng = np.random.default_rng(0)
    lut = trainid_to_labelid_lut()
    matrix = ConfusionMatrix(NUM_CLASSES)
    pred_labelids, gt_labelids, present = [], [], set()
    for label_path in _val_labels(synthetic_root):
        gt = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
        present |= set(np.unique(gt).tolist())
        pred = _predictions(case, gt, rng)
        frame = label_path.name.replace("_gtFine_labelTrainIds.png", "")
        cv2.imwrite(str(tmp_path / f"{frame}_trainIds.png"), pred)
        cv2.imwrite(str(tmp_path / f"{frame}_pred_labelIds.png"), lut[pred])
        pred_labelids.append(str(tmp_path / f"{frame}_pred_labelIds.png"))
        gt_labelids.append(str(label_path).replace("labelTrainIds", "labelIds"))
        matrix.update(torch.from_numpy(pred), torch.from_numpy(gt))

    official = _official_scores(pred_labelids, gt_labelids)
    ours = matrix.compute()
    (tmp_path / "trainids").mkdir()
    for png in tmp_path.glob("*_trainIds.png"):
        png.rename(tmp_path / "trainids" / png.name)
    scored = score_predictions(tmp_path / "trainids", synthetic_root, "val")

    for result in (ours, scored):
        for name in CLASS_NAMES:
            expected, actual = official["classScores"][name], result["per_class_iou"][name]
            assert (math.isnan(expected) and math.isnan(actual)) or actual == pytest.approx(
                expected, abs=1e-6
            )
        for category in CATEGORIES:
            expected, actual = official["categoryScores"][category], result["category_iou"][category]
            assert (math.isnan(expected) and math.isnan(actual)) or actual == pytest.approx(
                expected, abs=1e-6
            )
        assert result["miou"] == pytest.approx(official["averageScoreClasses"], abs=1e-6)
        assert result["mean_category_iou"] == pytest.approx(official["averageScoreCategories"], abs=1e-6)
    assert scored["num_images"] == len(gt_labelids)

    if case == "perfect":
        assert ours["miou"] == 1.0 and ours["pixel_accuracy"] == 1.0
    absent = [name for train_id, name in enumerate(CLASS_NAMES) if train_id not in present]
    assert absent, "the synthetic val split should miss some classes"
    if case in ("perfect", "absent-class"):
        # Neither in the ground truth nor predicted: NaN, left out of the mean.
        assert all(math.isnan(ours["per_class_iou"][name]) for name in absent)
    if case == "absent-class":
        assert ours["miou"] < 1.0
    if case == "random":
        # Classes absent from the ground truth but predicted score 0, not NaN (they enter the mean).
        assert not any(math.isnan(v) for v in ours["per_class_iou"].values())


def test_no_prediction_column_and_ignore() -> None:
    matrix = ConfusionMatrix(3)
    target = torch.tensor([0, 0, 1, 2, 255, 255])
    pred = torch.tensor([0, 7, 1, 1, 2, 255])  # 7: an unmapped class = a miss for class 0
    matrix.update(pred, target)
    assert matrix.matrix.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 0]]
    assert matrix.no_prediction.tolist() == [1, 0, 0]
    scores = matrix.compute()
    assert scores["per_class_iou"] == {"class_0": 0.5, "class_1": 0.5, "class_2": 0.0}
    assert scores["pixel_accuracy"] == pytest.approx(2 / 4)
    assert np.array_equal(confusion_counts(pred.numpy(), target.numpy(), 3), matrix.counts.numpy())


def _tiny_model_and_val_subset(root: str) -> tuple[torch.nn.Module, Subset]:
    from components.config import load_config
    from components.data.dataset import CityscapesSegmentation
    from components.model import build_model

    torch.manual_seed(0)
    model = build_model(load_config("demo", ["model.weights=none"]).model)
    return model, Subset(CityscapesSegmentation(root, "val"), range(3))  # uneven: ranks get 2 and 1


def _ddp_worker(rank: int, world: int, init_file: str, shards: list, root: str, out_dir: str) -> None:
    from components.evaluate import eval_loader, evaluate_model

    torch.set_num_threads(1)  # two ranks share the CI machine's cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        matrix = ConfusionMatrix(NUM_CLASSES, "cpu")
        for pred, target in shards[rank]:
            matrix.update(pred, target)
        torch.save(matrix.reduce().counts, os.path.join(out_dir, f"reduce{rank}.pt"))
        model, dataset = _tiny_model_and_val_subset(root)
        scored = evaluate_model(model, eval_loader(dataset), num_classes=NUM_CLASSES, device="cpu")
        torch.save(scored.counts, os.path.join(out_dir, f"evaluate{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_reduce_and_sharded_evaluation_under_a_real_gloo_group(synthetic_root: Path, tmp_path: Path) -> None:
    from components.evaluate import eval_loader, evaluate_model

    generator = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randint(0, NUM_CLASSES + 2, (2, 16, 32), generator=generator),
            torch.randint(0, NUM_CLASSES, (2, 16, 32), generator=generator),
        )
        for _ in range(5)
    ]
    single = ConfusionMatrix(NUM_CLASSES)
    for pred, target in batches:
        single.update(pred, target)
    single.reduce()  # no process group: a no-op
    model, dataset = _tiny_model_and_val_subset(str(synthetic_root))
    scored = evaluate_model(model, eval_loader(dataset), num_classes=NUM_CLASSES, device="cpu")

    shards = [batches[0::2], batches[1::2]]
    args = (2, str(tmp_path / "init"), shards, str(synthetic_root), str(tmp_path))
    mp.spawn(_ddp_worker, args=args, nprocs=2, join=True)
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"reduce{rank}.pt"), single.counts)
        # Each rank scored its own shard; after the all-reduce every image counts exactly once.
        assert torch.equal(torch.load(tmp_path / f"evaluate{rank}.pt"), scored.counts)
    assert int(single.counts.sum()) == 5 * 2 * 16 * 32
    valid = sum(int((dataset[i][1] != 255).sum()) for i in range(len(dataset)))
    assert int(scored.counts[:NUM_CLASSES].sum()) == valid


def test_confusion_counts_of_uint8_maps_equal_the_torch_matrix() -> None:
    rng = np.random.default_rng(3)
    for _ in range(5):
        target = rng.choice([*range(NUM_CLASSES), 255], (33, 47)).astype(np.uint8)
        pred = rng.integers(0, 256, target.shape, dtype=np.uint8)  # every byte, valid or not
        agree = rng.random(target.shape) < 0.5
        pred[agree] = target[agree]
        matrix = ConfusionMatrix(NUM_CLASSES)
        matrix.update(torch.from_numpy(pred), torch.from_numpy(target))
        assert np.array_equal(confusion_counts(pred, target, NUM_CLASSES), matrix.counts.numpy())
