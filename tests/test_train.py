"""The trainer in one process: batch planning, LR schedule, learning on synthetic data, MLflow record."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import torch

from components.config import Config, load_config
from components.errors import ConfigError
from components.optim import build_optimizer, build_scheduler, lr_factor, param_groups
from components.train import BatchPlan, plan_batches, result_path, train


def tiny_config(root: Path, tmp_path: Path, *overrides: str) -> Config:
    """The demo recipe shrunk to the 64x128 synthetic fixture: mobilenet, no weights, 1-2 s epochs."""
    return load_config(
        "demo",
        [
            f"data.root={root}",
            "data.num_workers=0",
            "augment.crop=[64, 128]",
            "model.backbone=mobilenet_v3_large",
            "model.weights=none",
            "train.global_batch_size=4",
            "train.log_every=100",
            f"train.output_dir={tmp_path / 'train'}",
            f"run_dir={tmp_path}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.system_metrics=false",
            *overrides,
        ],
    )


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Two test processes share two cores: more torch threads per process only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_batch_plan_derives_per_rank_batch_and_accumulation() -> None:
    cfg = load_config("strong", ["train.global_batch_size=16", "train.micro_batch_size=2"])
    assert plan_batches(cfg.train, 4) == BatchPlan(per_rank=4, micro=2, accumulation=2)
    assert plan_batches(cfg.train, 1) == BatchPlan(per_rank=16, micro=2, accumulation=8)
    assert plan_batches(cfg.train, 8) == BatchPlan(per_rank=2, micro=2, accumulation=1)
    uncapped = load_config("strong", ["train.global_batch_size=24"])
    assert plan_batches(uncapped.train, 3) == BatchPlan(per_rank=8, micro=8, accumulation=1)


def test_batch_plan_refuses_uneven_splits() -> None:
    cfg = load_config("paper")  # global batch 24
    with pytest.raises(ConfigError, match=r"train\.global_batch_size=24 .*world size 5"):
        plan_batches(cfg.train, 5)
    cfg = load_config("paper", ["train.micro_batch_size=5"])
    with pytest.raises(ConfigError, match=r"train\.micro_batch_size=5 .*per-rank batch 12"):
        plan_batches(cfg.train, 2)


def test_strong_schedule_warms_up_then_decays_polynomially() -> None:
    opt_cfg = load_config("strong", ["optimizer.warmup_iters=10", "optimizer.warmup_factor=0.1"]).optimizer
    total = 100
    assert lr_factor(0, opt_cfg, total) == pytest.approx(0.1)
    assert lr_factor(5, opt_cfg, total) == pytest.approx(0.55 * 0.95**0.9)
    assert lr_factor(10, opt_cfg, total) == pytest.approx(0.9**0.9)
    assert lr_factor(100, opt_cfg, total) == 0.0

    model = torch.nn.ModuleDict(
        {"backbone": torch.nn.Conv2d(3, 4, 1), "classifier": torch.nn.Conv2d(4, 2, 1)}
    )
    groups = param_groups(model, opt_cfg)
    assert [g["lr"] for g in groups] == pytest.approx([0.02, 0.2])  # head at 10x (strong recipe)
    assert [len(g["params"]) for g in groups] == [2, 2]
    optimizer = build_optimizer(model, opt_cfg, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, opt_cfg, total)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr() == pytest.approx([0.02 * 0.9**0.9, 0.2 * 0.9**0.9])


def test_paper_schedule_is_constant() -> None:
    opt_cfg = load_config("paper").optimizer
    assert {lr_factor(i, opt_cfg, 50) for i in (0, 7, 49)} == {1.0}


@pytest.mark.slow
def test_training_learns_and_is_tracked_in_mlflow(
    synthetic_root: Path, tmp_path: Path, one_thread: None
) -> None:
    from components.data.dataset import CityscapesSegmentation
    from components.data.prepare import dataset_fingerprint
    from components.data.transforms import eval_transform
    from components.evaluate import eval_loader, evaluate_model
    from components.model import build_model

    epochs = 8
    cfg = tiny_config(synthetic_root, tmp_path, f"train.epochs={epochs}", "train.val_every=1")
    # The untrained model, initialised exactly as train() initialises it.
    torch.manual_seed(cfg.train.seed)
    untrained = build_model(cfg.model)
    val = CityscapesSegmentation(synthetic_root, "val", eval_transform(cfg.augment))
    baseline = evaluate_model(untrained, eval_loader(val), num_classes=19, device="cpu").compute()["miou"]

    result = train(cfg)

    # From scratch at 64x128 the model learns the large classes (road, sidewalk, sky) within seconds;
    # measured: baseline 0.0003, best val mIoU 0.11-0.16 after 2-12 epochs (0.12-0.16 after 30).
    assert baseline < 0.02
    assert result.best_miou > 0.10, f"val mIoU {result.best_miou:.3f} after {epochs} epochs"
    assert result.epochs_completed == epochs
    assert result.best_checkpoint == str(tmp_path / "train" / "best.pt")
    assert result.last_checkpoint == str(tmp_path / "train" / f"epoch_{epochs:04d}.pt")
    assert json.loads(result_path(cfg).read_text())["best_miou"] == result.best_miou

    client = mlflow.MlflowClient(cfg.resolved_tracking_uri())
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == str(epochs)
    assert run.data.params["model.backbone"] == "mobilenet_v3_large"
    assert run.data.tags["dataset_fingerprint"] == dataset_fingerprint(synthetic_root)
    assert run.data.tags["world_size"] == "1"
    assert run.data.tags["git_commit"]
    assert run.data.tags["torch_version"] == torch.__version__
    for name in ("train_loss", "lr", "images_per_second", "val_miou", "val_iou_road"):
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == list(range(1, epochs + 1)), name
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert losses[-1] < 0.7 * losses[0]
    best = max(m.value for m in client.get_metric_history(run.info.run_id, "val_miou"))
    assert best == pytest.approx(result.best_miou)

    artifacts = Path(
        mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "a"))
    )
    metrics = json.loads((artifacts / "metrics.json").read_text())
    assert metrics["best_miou"] == pytest.approx(result.best_miou)
    assert not math.isnan(metrics["per_class_iou"]["road"])
    assert load_config(artifacts / "config.yaml") == cfg
