"""evaluate() end to end on the synthetic dataset: reports, MLflow run, protocols, baselines, CLI, DDP."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import cv2
import mlflow
import pytest
import torch

from components.checkpoint import save_checkpoint
from components.config import Config, load_config
from components.data.cache import CACHE_DIR
from components.errors import DataError
from components.evaluate import (
    evaluate,
    main,
    predict_trainids,
    score_predictions,
    voc_to_trainid_map,
)
from components.labels import CLASS_NAMES, NUM_CLASSES
from components.model import build_model


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module: creating its schema is the slow part."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _cfg(tmp_path: Path, tracking_uri: str, *overrides: str) -> Config:
    return load_config(
        "demo",
        [
            "model.weights=none",
            "data.num_workers=0",
            "evaluate.num_overlays=2",
            f"tracking.tracking_uri={tracking_uri}",
            "tracking.system_metrics=false",
            f"run_dir={tmp_path / 'runs'}",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    cfg = load_config("demo", ["model.weights=none"])
    state = {"model": build_model(cfg.model).state_dict(), "config": cfg.model_dump(mode="json"), "epoch": 1}
    return save_checkpoint(state, str(tmp_path_factory.mktemp("ckpt")))


def _saved_predictions(checkpoint: str, root: Path, out: Path) -> None:
    """Predict every val image one by one and save trainId PNGs (an independent path to the scores)."""
    from components.data.dataset import CityscapesSegmentation
    from components.model import load_model

    model, _ = load_model(checkpoint)
    dataset = CityscapesSegmentation(root, "val")
    out.mkdir()
    for i, image_path in enumerate(dataset.image_paths):
        image, label = dataset[i]
        pred = predict_trainids(model, image[None], tuple(label.shape))[0].to(torch.uint8).numpy()
        cv2.imwrite(str(out / image_path.name.replace("leftImg8bit", "pred")), pred)


@pytest.mark.slow
def test_evaluate_writes_reports_and_mlflow_run(
    synthetic_root: Path, tmp_path: Path, checkpoint: str, tracking_uri: str
) -> None:
    cfg = _cfg(tmp_path, tracking_uri, f"data.root={synthetic_root}")
    out = tmp_path / "eval"
    metrics = evaluate(cfg, checkpoint, str(out), run_name="eval-test")

    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["protocol"] == "official" and on_disk["num_images"] == 4
    assert 0.0 <= on_disk["miou"] <= 1.0 and on_disk["model"] == checkpoint
    assert set(on_disk["per_class_iou"]) == set(CLASS_NAMES)
    for name in ("per_class_iou.md", "confusion_matrix.png", "per_class_iou.png"):
        assert (out / name).stat().st_size > 0
    overlays = sorted((out / "overlays").glob("*.png"))
    assert len(overlays) == 2
    assert cv2.imread(str(overlays[0])).shape == (64, 3 * 128, 3)  # image | ground truth | prediction
    assert "| **mean (mIoU)** |" in (out / "per_class_iou.md").read_text()
    assert not list(out.rglob("*.tmp"))

    # The same numbers as scoring saved full-resolution predictions, image by image.
    _saved_predictions(checkpoint, synthetic_root, tmp_path / "preds")
    scored = score_predictions(tmp_path / "preds", synthetic_root)
    assert metrics["miou"] == pytest.approx(scored["miou"], abs=1e-9)
    assert metrics["per_class_iou"] == pytest.approx(scored["per_class_iou"], abs=1e-9, nan_ok=True)

    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    run = mlflow.get_run(metrics["mlflow_run_id"])
    assert run.data.metrics["val_miou"] == pytest.approx(metrics["miou"])
    assert run.data.metrics["val_iou_road"] == pytest.approx(metrics["per_class_iou"]["road"])
    assert run.data.tags["stage"] == "evaluation" and run.data.tags["baseline"] == "none"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"metrics.json", "confusion_matrix.png", "per_class_iou.png", "overlays"} <= artifacts


@pytest.mark.slow
def test_resized_protocol_is_labelled_and_baselines(
    synthetic_root: Path, tmp_path: Path, tracking_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    data = f"data.root={synthetic_root}"
    cfg = _cfg(tmp_path, tracking_uri, data, "evaluate.resize=[32,64]", "evaluate.num_overlays=0")
    metrics = evaluate(cfg, None, str(tmp_path / "paper"), baseline="paper-baseline")
    assert metrics["protocol"] == "resized 32x64"
    logged = mlflow.get_run(metrics["mlflow_run_id"]).data.metrics
    assert logged["val_resized_32x64_miou"] == pytest.approx(metrics["miou"])
    assert "val_miou" not in logged

    with caplog.at_level(logging.WARNING, logger="components.evaluate"):
        zero_shot = evaluate(
            _cfg(tmp_path, tracking_uri, data, "evaluate.num_overlays=0"),
            None,
            str(tmp_path / "zero"),
            baseline="zero-shot",
            log_to_mlflow=False,
        )
    assert "random" in caplog.text
    assert zero_shot["mlflow_run_id"] is None and zero_shot["protocol"] == "official"
    # Only the six mapped VOC classes can ever be predicted: every other class present scores 0.
    for name, iou in zero_shot["per_class_iou"].items():
        if name not in ("person", "car", "bus", "train", "motorcycle", "bicycle"):
            assert iou == 0.0 or math.isnan(iou)


def test_voc_mapping() -> None:
    mapping = voc_to_trainid_map("resnet50")
    assert mapping.shape == (21,)
    pairs = {"person": 15, "car": 7, "bus": 6, "train": 19, "motorcycle": 14, "bicycle": 2}  # VOC indices
    for name, voc_id in pairs.items():
        assert mapping[voc_id] == CLASS_NAMES.index(name)
    assert int((mapping < NUM_CLASSES).sum()) == 6


def test_score_predictions_cli_and_missing_file(
    synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    preds = tmp_path / "preds"
    preds.mkdir()
    labels = sorted((synthetic_root / "gtFine" / "val").glob("*/*_labelTrainIds.png"))
    for label in labels:
        (preds / label.name.replace("gtFine_labelTrainIds", "pred")).write_bytes(label.read_bytes())
    main(["--predictions", str(preds), "--data", str(synthetic_root), "--out", str(tmp_path / "m.json")])
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["miou"] == 1.0 and metrics["num_images"] == len(labels)
    assert "mIoU 100.00%" in capsys.readouterr().out

    missing = preds / labels[0].name.replace("gtFine_labelTrainIds", "pred")
    missing.unlink()
    with pytest.raises(DataError, match=labels[0].name[: -len("_gtFine_labelTrainIds.png")]):
        score_predictions(preds, synthetic_root)


def test_scoring_without_a_writable_label_cache_decodes_the_ground_truth(
    synthetic_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "gtFine", root / "gtFine")
    preds = tmp_path / "preds"
    preds.mkdir()
    for index, label in enumerate(sorted((root / "gtFine" / "val").glob("*/*_labelTrainIds.png"))):
        pred = cv2.imread(str(label), cv2.IMREAD_UNCHANGED)
        pred[: 8 * (index + 1), :16] = index  # a different mistake per image
        cv2.imwrite(str(preds / label.name.replace("gtFine_labelTrainIds", "pred")), pred)
    cached = score_predictions(preds, root)
    assert list((root / CACHE_DIR).glob("val_labels_*.labels.u8"))

    shutil.rmtree(root / CACHE_DIR)
    (root / CACHE_DIR).write_text("not a folder")  # like a read-only dataset: the cache cannot be made
    with caplog.at_level(logging.WARNING, logger="components.evaluate"):
        decoded = score_predictions(preds, root)
    assert "cannot cache the ground truth" in caplog.text
    assert decoded["miou"] < 1.0
    assert decoded["per_class_iou"] == pytest.approx(cached["per_class_iou"], abs=0, nan_ok=True)
