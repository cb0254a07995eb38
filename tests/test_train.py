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
from components.data.sampling import train_loader
from components.data.transforms import check_crop_fits
from components.errors import ConfigError
from components.optim import build_optimizer, build_scheduler, lr_factor, param_groups
from components.train import train
from components.train_contract import read_result
from components.trainer import BatchPlan, plan_batches
from tests.conftest import prepared_synthetic

# Measured (2 cores): baseline 0.0003-0.008, best val mIoU 0.148-0.216 after 30 epochs x 4 steps (40-73 s).
# Each CPU gives one value every run (seeded); the spread is between CPUs: 0.148 on an AVX-512 AMD EPYC.
EPOCHS, VAL_EVERY, BAR = 30, 10, 0.10


def tiny_config(root: Path, tmp_path: Path, *overrides: str) -> Config:
    """The demo recipe shrunk to the 64x128 synthetic fixture: mobilenet, no weights, 1-2 s epochs."""
    return load_config(
        "demo",
        [
            f"data.root={root}",
            "data.num_workers=0",
            "augment.crop=[64, 128]",
            "augment.photometric=true",  # the demo has none; the resume tests want every kind of randomness
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
    # Python float arithmetic (IEEE 754, no vector kernels): exact on every CPU.
    assert lr_factor(0, opt_cfg, total) == 0.1
    assert lr_factor(5, opt_cfg, total) == 0.55 * 0.95**0.9
    assert lr_factor(10, opt_cfg, total) == 0.9**0.9
    assert lr_factor(100, opt_cfg, total) == 0.0

    model = torch.nn.ModuleDict(
        {"backbone": torch.nn.Conv2d(3, 4, 1), "classifier": torch.nn.Conv2d(4, 2, 1)}
    )
    groups = param_groups(model, opt_cfg)
    assert [g["lr"] for g in groups] == [0.02, 0.2]  # head at 10x (strong recipe)
    assert [len(g["params"]) for g in groups] == [2, 2]
    optimizer = build_optimizer(model, opt_cfg)
    scheduler = build_scheduler(optimizer, opt_cfg, total)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr() == [0.02 * 0.9**0.9, 0.2 * 0.9**0.9]


def test_defaults_are_the_strong_recipe() -> None:
    assert load_config("strong") == Config()


def test_paper_schedule_is_constant() -> None:
    opt_cfg = load_config("paper").optimizer
    assert {lr_factor(i, opt_cfg, 50) for i in (0, 7, 49)} == {1.0}


@pytest.fixture(scope="module")
def learnable_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic frames large enough (128x256) for the stride-16 model to resolve the big classes."""
    return prepared_synthetic(tmp_path_factory.mktemp("learnable"), train=16, val=4, height=128, width=256)


@pytest.mark.slow
def test_training_learns_and_is_tracked_in_mlflow(
    learnable_root: Path, tmp_path: Path, one_thread: None
) -> None:
    from components.data.dataset import CityscapesSegmentation
    from components.data.prepare import dataset_fingerprint
    from components.data.transforms import eval_transform
    from components.evaluate import eval_loader, evaluate_model
    from components.model import build_model

    epochs, val_every = EPOCHS, VAL_EVERY
    cfg = tiny_config(
        learnable_root,
        tmp_path,
        f"train.epochs={epochs}",
        f"train.val_every={val_every}",
        "augment.photometric=false",
    )
    # The untrained model, initialised exactly as train() initialises it.
    torch.manual_seed(cfg.train.seed)
    untrained = build_model(cfg.model)
    val = CityscapesSegmentation(learnable_root, "val", eval_transform(cfg.augment))
    baseline = evaluate_model(untrained, eval_loader(val), num_classes=19, device="cpu").compute()["miou"]

    result = train(cfg)

    print(f"baseline {baseline:.4f} best {result.best_miou:.4f}")
    assert baseline < 0.05
    assert result.best_miou > BAR, f"val mIoU {result.best_miou:.3f} after {epochs} epochs"
    assert result.epochs_completed == epochs
    assert result.best_checkpoint == str(tmp_path / "train" / "best.pt")
    assert result.last_checkpoint == str(tmp_path / "train" / f"epoch_{epochs:04d}.pt")
    assert read_result(cfg.train.output_dir) == result

    client = mlflow.MlflowClient(cfg.resolved_tracking_uri())
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == str(epochs)
    assert run.data.params["model.backbone"] == "mobilenet_v3_large"
    assert run.data.tags["dataset_fingerprint"] == dataset_fingerprint(learnable_root)
    assert run.data.tags["world_size"] == "1"
    assert run.data.tags["git_commit"]
    assert run.data.tags["torch_version"] == torch.__version__
    for name in ("train_loss", "lr", "images_per_second"):
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == list(range(1, epochs + 1)), name
    for name in ("val_miou", "val_iou_road"):
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == list(range(val_every, epochs + 1, val_every)), name
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert losses[-1] < 0.5 * losses[0]
    best = max(m.value for m in client.get_metric_history(run.info.run_id, "val_miou"))
    assert best == result.best_miou

    artifacts = Path(
        mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "a"))
    )
    metrics = json.loads((artifacts / "metrics.json").read_text())
    assert metrics["best_miou"] == result.best_miou
    assert not math.isnan(metrics["per_class_iou"]["road"])
    # The demo recipe trains without the aux head (aux_weight 0): the logged config says so.
    assert load_config(artifacts / "config.yaml") == cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"aux_loss": False})}
    )


def test_augmentation_is_seeded_per_sample_whatever_the_workers(synthetic_root: Path, tmp_path: Path) -> None:
    from components.data.dataset import CityscapesSegmentation
    from components.data.transforms import train_transform

    def epochs(workers: int) -> list[list[torch.Tensor]]:
        cfg = tiny_config(synthetic_root, tmp_path, f"data.num_workers={workers}")
        loader = train_loader(
            cfg, CityscapesSegmentation(synthetic_root, "train", train_transform(cfg.augment)), 4
        )
        batches = []
        for epoch in (0, 1, 0):
            loader.sampler.set_epoch(epoch)
            batches.append([image for image, _ in loader])
        return batches

    in_process, in_workers = epochs(0), epochs(2)
    for first, second in zip(in_process, in_workers, strict=True):
        assert len(first) == 2  # 8 images, batch 4
        assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(in_process[0], in_process[2], strict=True))  # replayable
    assert not torch.equal(in_process[0][0], in_process[1][0])  # yet every epoch differs


def test_crop_larger_than_the_images_is_refused_before_training(synthetic_root: Path, tmp_path: Path) -> None:
    # The fixture's frames are 128x64: scaled by at most 1.5 they give 96x192 (height x width).
    cfg = tiny_config(synthetic_root, tmp_path, "augment.crop=[96, 256]", "augment.scale_range=[0.5, 1.5]")
    with pytest.raises(ConfigError, match=r"augment\.crop=\[96, 256\] .*128x64 pixels.*\[96, 192\]"):
        train(cfg)
    assert not (tmp_path / "train").exists()
    check_crop_fits(cfg.augment.model_copy(update={"crop": (96, 192)}), synthetic_root)
    check_crop_fits(cfg.augment.model_copy(update={"scale_range": (0.5, 2.0)}), synthetic_root)
    paper_like = load_config("paper", ["augment.resize=[32, 64]", "augment.crop=[48, 64]"]).augment
    with pytest.raises(ConfigError, match=r"augment\.crop=\[48, 64\] .*augment\.resize=\[32, 64\]"):
        check_crop_fits(paper_like, synthetic_root)


@pytest.mark.slow
def test_without_aux_weight_the_aux_head_is_not_trained_nor_saved(
    synthetic_root: Path, tmp_path: Path, one_thread: None
) -> None:
    from components.checkpoint import load_checkpoint
    from components.model import load_model

    cfg = tiny_config(synthetic_root, tmp_path, "train.epochs=1", "train.aux_weight=0", "model.aux_loss=true")
    result = train(cfg)

    saved = load_checkpoint(result.last_checkpoint)
    assert saved["model"] and not [name for name in saved["model"] if name.startswith("aux_classifier.")]
    assert saved["config"]["model"]["aux_loss"] is False
    model, saved_cfg = load_model(result.best_checkpoint)
    assert model.aux_classifier is None and saved_cfg.train.aux_weight == 0
    assert set(model(torch.zeros(1, 3, 64, 128))) == {"out"}


def test_cli_takes_a_recipe_and_reports_a_bad_one_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from components.train import main

    assert main(["--recipe", "demo", "train.epochs=zero"]) == 1
    assert capsys.readouterr().err.strip().startswith("error: invalid configuration: train.epochs")
    assert main(["--config", "no-such-recipe"]) == 1  # --config: the older spelling
    assert "unknown recipe 'no-such-recipe'" in capsys.readouterr().err
