"""Validation-set evaluation with the official Cityscapes protocol, for trained models and baselines.

Official protocol: logits are upsampled (bilinear, align_corners=False) to the label's full resolution
before the argmax, and scores are those of cityscapesscripts (see components.metrics). A resized
evaluation (``evaluate.resize``) is opt-in and labelled ``protocol: "resized HxW"`` in metrics.json and
``val_resized_HxW_*`` in MLflow metric names.

Baselines, evaluated the same way:
  * ``paper-baseline`` - ``build_model(cfg.model)`` untrained: pretrained weights, fresh 19-class heads;
  * ``zero-shot`` - torchvision's COCO/VOC model with its own 21-class head, VOC classes mapped onto
    Cityscapes trainIds; every other VOC class is "no prediction" (a miss for the pixel's class).

    python -m components.evaluate --model runs/train/best.pt data.root=data/cityscapes
    python -m components.evaluate --baseline zero-shot --recipe paper data.root=data/cityscapes
    python -m components.evaluate --predictions preds/ --data data/cityscapes --out metrics.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from components import plots
from components.cli import run_cli
from components.config import Config, load_config
from components.data.cache import open_label_cache
from components.data.fastpng import imread_unchanged
from components.distributed import rank_world
from components.errors import ConfigError, DataError
from components.labels import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES
from components.metrics import ConfusionMatrix, class_names, confusion_counts
from components.model import build_model, load_model, pretrained_categories
from components.storage import atomic_path

logger = logging.getLogger(__name__)

BASELINES = ("paper-baseline", "zero-shot")
# VOC class (torchvision's category name) -> Cityscapes class, for the zero-shot baseline.
VOC_TO_CITYSCAPES = {
    "person": "person",
    "car": "car",
    "bus": "bus",
    "train": "train",
    "motorbike": "motorcycle",
    "bicycle": "bicycle",
}


def eval_loader(dataset: Dataset, *, batch_size: int = 1, num_workers: int = 0) -> DataLoader:
    """A loader over this rank's shard (rank, rank+world, ...): every image scored exactly once."""
    rank, world = rank_world()
    shard = Subset(dataset, range(rank, len(dataset), world)) if world > 1 else dataset
    return DataLoader(
        shard,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )


@torch.inference_mode()
def evaluate_model(
    model: nn.Module,
    loader: DataLoader,
    *,
    num_classes: int,
    device: torch.device | str,
    resize: tuple[int, int] | None = None,
    autocast_dtype: torch.dtype | None = None,
    prediction_map: torch.Tensor | None = None,
) -> ConfusionMatrix:
    """Score ``loader`` (build it with :func:`eval_loader` under DDP); returns the all-reduced matrix.

    ``resize`` resizes images (bilinear) and labels (nearest) of batches not already at that size;
    ``prediction_map`` re-labels the argmax (index = model class, value = trainId, >= num_classes = none).
    """
    device = torch.device(device)
    matrix = ConfusionMatrix(num_classes, device)
    was_training = model.training
    model.eval()
    # Bars on a terminal only (None): in a relayed pipe their text would land inside log lines.
    for images, labels in tqdm(
        loader, desc="evaluate", disable=None if rank_world()[0] == 0 else True, leave=False
    ):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if resize is not None and tuple(labels.shape[-2:]) != tuple(resize):
            images = F.interpolate(images, size=resize, mode="bilinear", align_corners=False)
            labels = F.interpolate(labels[:, None].float(), size=resize, mode="nearest")[:, 0].long()
        pred = predict_trainids(model, images, tuple(labels.shape[-2:]), autocast_dtype, prediction_map)
        matrix.update(pred, labels)
    model.train(was_training)
    return matrix.reduce()


def predict_trainids(
    model: nn.Module,
    images: torch.Tensor,
    size: tuple[int, int],
    autocast_dtype: torch.dtype | None = None,
    prediction_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B,3,h,w] normalised images -> [B,H,W] class ids, logits upsampled to ``size`` before argmax."""
    with torch.autocast(images.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = model(images)["out"]
    logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    pred = logits.argmax(dim=1)
    return prediction_map.to(pred.device)[pred] if prediction_map is not None else pred


def evaluate(
    cfg: Config,
    model_uri: str | None,
    out_dir: str,
    baseline: str | None = None,
    run_name: str | None = None,
    *,
    log_to_mlflow: bool = True,
) -> dict[str, Any]:
    """Evaluate a checkpoint/URI or a baseline on ``cfg.data.root``'s val split; write reports to ``out_dir``.

    With ``log_to_mlflow`` the reports go to MLflow through :func:`components.tracking.log_evaluation`
    (into an active run, e.g. the trainer's, else a run of its own). Returns metrics.json's content plus
    ``mlflow_run_id``.
    """
    from components.data.dataset import CityscapesSegmentation
    from components.data.transforms import eval_transform

    if (model_uri is None) == (baseline is None):
        raise ConfigError("evaluate needs exactly one of a model URI (--model) or a baseline (--baseline)")
    if baseline is not None and baseline not in BASELINES:
        raise ConfigError(f"unknown baseline {baseline!r}: choose one of {BASELINES}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, model_cfg, prediction_map = _model_to_evaluate(cfg, model_uri, baseline)
    model.to(device)
    num_classes = NUM_CLASSES if prediction_map is not None else model_cfg.model.num_classes
    resize = cfg.evaluate.resize
    transform = eval_transform(model_cfg.augment, resize)
    dataset = CityscapesSegmentation(cfg.data.root, "val", transform=transform)
    loader = eval_loader(dataset, batch_size=cfg.evaluate.batch_size, num_workers=cfg.data.num_workers)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" and cfg.train.amp != "none" else None
    matrix = evaluate_model(
        model,
        loader,
        num_classes=num_classes,
        device=device,
        resize=resize,
        autocast_dtype=autocast_dtype,
        prediction_map=prediction_map,
    )
    metrics = {
        **matrix.compute(),
        "protocol": protocol_name(resize),
        "num_images": len(dataset),
        "model": model_uri or f"{baseline} ({model_cfg.model.backbone}, weights={model_cfg.model.weights})",
    }
    if rank_world()[0] != 0:
        return metrics
    out = Path(out_dir)
    write_reports(metrics, matrix, out)
    samples = range(min(cfg.evaluate.num_overlays, len(dataset)))
    for i in tqdm(samples, desc="overlays", disable=None, leave=False):
        _write_overlay(model, dataset, i, out / "overlays", device, autocast_dtype, prediction_map)
    metrics["mlflow_run_id"] = None
    if log_to_mlflow:
        from components import tracking

        tags = {"baseline": baseline or "none", "model_uri": model_uri or "", "protocol": metrics["protocol"]}
        name = run_name or f"eval-{baseline or Path(model_uri).name}"
        metrics["mlflow_run_id"] = tracking.log_evaluation(cfg, scalar_metrics(metrics), out, name, tags)
    return metrics


def protocol_name(resize: tuple[int, int] | None) -> str:
    return "official" if resize is None else f"resized {resize[0]}x{resize[1]}"


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The scalar metrics under the names the training state and the tracking runs keep them: ``val_miou``,
    ``val_pixel_accuracy``, ``val_iou_<class>``, ... (``val_resized_HxW_*`` if resized)."""
    protocol = metrics["protocol"]
    prefix = "val_" if protocol == "official" else f"val_{protocol.replace(' ', '_')}_"
    flat = {
        "miou": metrics["miou"],
        "pixel_accuracy": metrics["pixel_accuracy"],
        "mean_category_iou": metrics["mean_category_iou"],
        **{f"iou_{name}": iou for name, iou in metrics["per_class_iou"].items()},
        **{f"category_iou_{name}": iou for name, iou in metrics["category_iou"].items()},
    }
    # NaN means "class absent from the ground truth": left out rather than plotted as a gap.
    return {prefix + k.replace(" ", "_"): v for k, v in flat.items() if not math.isnan(v)}


def write_reports(metrics: Mapping[str, Any], matrix: ConfusionMatrix, out: Path) -> None:
    """metrics.json, per_class_iou.md, confusion_matrix.png and per_class_iou.png in ``out``."""
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    with atomic_path(out / "per_class_iou.md") as tmp:
        tmp.write_text(iou_table(metrics))
    title = f"{metrics['model']} - {metrics['protocol']}"
    names = class_names(matrix.num_classes)
    plots.save_confusion_matrix(matrix.matrix.cpu().numpy(), names, out / "confusion_matrix.png", title)
    plots.save_per_class_iou(metrics["per_class_iou"], out / "per_class_iou.png", title)


def iou_table(metrics: Mapping[str, Any]) -> str:
    """A markdown table of per-class and per-category IoU (in %, n/a = absent from the ground truth)."""

    def pct(value: float) -> str:
        return "n/a" if math.isnan(value) else f"{100 * value:.2f}"

    lines = [
        f"Model: `{metrics['model']}` - protocol: {metrics['protocol']} - {metrics['num_images']} images",
        "",
        "| class | IoU (%) |",
        "|---|---:|",
        *(f"| {name} | {pct(iou)} |" for name, iou in metrics["per_class_iou"].items()),
        f"| **mean (mIoU)** | **{pct(metrics['miou'])}** |",
    ]
    if metrics["category_iou"]:
        lines += ["", "| category | IoU (%) |", "|---|---:|"]
        lines += [f"| {name} | {pct(iou)} |" for name, iou in metrics["category_iou"].items()]
        lines.append(f"| **mean** | **{pct(metrics['mean_category_iou'])}** |")
    lines.append(f"\nPixel accuracy: {pct(metrics['pixel_accuracy'])}%")
    return "\n".join(lines) + "\n"


def score_predictions(pred_dir: str | Path, data_root: str | Path, split: str = "val") -> dict[str, Any]:
    """Score saved trainId PNGs against ``gtFine/<split>`` like the benchmark server.

    Predictions are found anywhere under ``pred_dir`` and matched to ground truth by the
    ``<city>_<seq>_<frame>`` prefix of their file name; a missing one is a DataError naming it.
    The ground truth is decoded once into the dataset's label cache and read from there afterwards.
    """
    ground_truth = sorted(Path(data_root, "gtFine", split).glob("*/*_gtFine_labelTrainIds.png"))
    if not ground_truth:
        raise DataError(
            f"no *_gtFine_labelTrainIds.png under {Path(data_root, 'gtFine', split)}; "
            "prepare the dataset first (python -m components.data prepare)"
        )
    predictions: dict[str, Path] = {}
    for path in Path(pred_dir).rglob("*.png"):
        key = _frame_key(path)
        if key in predictions:
            raise DataError(f"two predictions for frame {key}: {predictions[key]} and {path}; keep one")
        predictions[key] = path
    for gt in ground_truth:
        if _frame_key(gt) not in predictions:
            raise DataError(f"no prediction {_frame_key(gt)}*.png under {pred_dir} for ground truth {gt}")
    read_gt = _ground_truth_reader(Path(data_root), split, ground_truth)

    def pair_counts(index: int) -> np.ndarray:
        gt_path = ground_truth[index]
        pred_path = predictions[_frame_key(gt_path)]
        gt = read_gt(index)
        pred = _read_ids(pred_path, scratch=True)  # counted before this thread reads the next one
        if pred.shape != gt.shape:
            raise DataError(
                f"{pred_path} is {pred.shape[::-1]} but its ground truth {gt_path} is {gt.shape[::-1]}"
            )
        return confusion_counts(pred, gt, NUM_CLASSES)

    # OpenCV, zlib-ng and torch release the GIL while decoding and counting: threads scale over images,
    # and one more thread than cores keeps them busy while another waits for the GIL.
    with ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) + 1)) as pool:
        jobs = pool.map(pair_counts, range(len(ground_truth)))
        total = sum(tqdm(jobs, total=len(ground_truth), desc="score", disable=None, leave=False))
    matrix = ConfusionMatrix(NUM_CLASSES)
    matrix.add_counts(total)
    return {
        **matrix.compute(),
        "protocol": "official",
        "num_images": len(ground_truth),
        "model": str(pred_dir),
    }


def _ground_truth_reader(root: Path, split: str, ground_truth: list[Path]) -> Callable[[int], np.ndarray]:
    """Reads label i from the dataset's label cache, or from its PNG where the cache cannot be written."""
    try:
        return open_label_cache(root, split, ground_truth).label
    except OSError as exc:
        logger.warning("cannot cache the ground truth under %s (%s): decoding every label", root, exc)
        return lambda index: _read_ids(ground_truth[index])


def _read_ids(path: Path, scratch: bool = False) -> np.ndarray:
    ids = imread_unchanged(path, scratch=scratch)
    if ids is None:
        raise DataError(f"cannot read {path} as a PNG")
    if ids.ndim != 2:
        raise DataError(f"{path} has {ids.shape[2]} channels; predictions are single-channel trainId PNGs")
    return ids


def _frame_key(path: Path) -> str:
    """``aachen_000000_000019`` from any Cityscapes-style file name."""
    return "_".join(path.name.split("_")[:3])


def _model_to_evaluate(
    cfg: Config, model_uri: str | None, baseline: str | None
) -> tuple[nn.Module, Config, torch.Tensor | None]:
    """(model, the config it was built from, prediction map for the zero-shot baseline)."""
    if model_uri is not None:
        model, model_cfg = load_model(model_uri)
        return model, model_cfg, None
    if baseline == "paper-baseline":
        return build_model(cfg.model), cfg, None
    weights = "none" if cfg.model.weights.lower() == "none" else "DEFAULT"
    if weights == "none":
        logger.warning("zero-shot baseline with model.weights=none: the VOC head is random, expect ~0 mIoU")
    zero_shot = cfg.model.model_copy(update={"weights": weights, "num_classes": 21, "aux_loss": False})
    model = build_model(zero_shot)
    return model, cfg.model_copy(update={"model": zero_shot}), voc_to_trainid_map(cfg.model.backbone)


def voc_to_trainid_map(backbone: str) -> torch.Tensor:
    """Index = VOC class of torchvision's weights, value = Cityscapes trainId (255 = no prediction)."""
    categories = pretrained_categories(backbone)
    mapping = torch.full((len(categories),), IGNORE_INDEX, dtype=torch.int64)
    for voc_id, name in enumerate(categories):
        if name in VOC_TO_CITYSCAPES:
            mapping[voc_id] = CLASS_NAMES.index(VOC_TO_CITYSCAPES[name])
    return mapping


@torch.inference_mode()
def _write_overlay(
    model: nn.Module,
    dataset: Any,
    index: int,
    directory: Path,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    prediction_map: torch.Tensor | None,
) -> None:
    image_path, label_path = Path(dataset.image_paths[index]), Path(dataset.label_paths[index])
    image = cv2.cvtColor(cv2.imread(str(image_path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    ground_truth = _read_ids(label_path)
    tensor = dataset[index][0][None].to(device)
    model.eval()
    pred = predict_trainids(model, tensor, ground_truth.shape, autocast_dtype, prediction_map)
    pred = pred[0].to(torch.uint8).cpu().numpy()
    plots.save_overlay(image, ground_truth, pred, directory / f"{_frame_key(image_path)}.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Evaluate a model or baseline on Cityscapes val (official protocol), or score saved "
        "trainId prediction PNGs."
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="checkpoint path, s3:// URI or models:/name@alias")
    what.add_argument("--baseline", choices=BASELINES, help="evaluate a baseline instead of a trained model")
    what.add_argument("--predictions", help="directory of trainId PNGs named <city>_<seq>_<frame>*.png")
    parser.add_argument(
        "--data", help="prepared dataset root (leftImg8bit/, gtFine/); same as data.root=... (default: that)"
    )
    parser.add_argument("--split", default="val", help="split to score with --predictions (default: val)")
    parser.add_argument("--recipe", default="strong", help="recipe name or YAML path (default: strong)")
    parser.add_argument("--out", help="output directory (metrics.json path with --predictions)")
    parser.add_argument("--run-name", help="MLflow run name")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log an MLflow run")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. evaluate.resize=[512,1024]")
    args = parser.parse_args(argv)
    return run_cli(lambda: _run(args))


def _run(args: argparse.Namespace) -> None:
    overrides = [*args.overrides, *([f"data.root={args.data}"] if args.data else [])]
    cfg = load_config(args.recipe, overrides)
    if args.predictions:
        metrics = score_predictions(args.predictions, cfg.data.root, args.split)
        out = Path(args.out or "metrics.json")
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    else:
        name = args.baseline or Path(args.model).stem
        out = Path(args.out or Path(cfg.run_dir) / "evaluate" / name)
        metrics = evaluate(
            cfg,
            args.model,
            str(out),
            args.baseline,
            args.run_name,
            log_to_mlflow=not args.no_mlflow,
        )
    print(
        f"mIoU {100 * metrics['miou']:.2f}% ({metrics['protocol']}, {metrics['num_images']} images) -> {out}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
