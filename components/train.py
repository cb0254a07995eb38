"""Fine-tune DeepLabv3 on Cityscapes: the entry point of one training process (a torchrun rank, or a
plain process). One code path for 1 CPU process, 1 GPU, N GPUs, N nodes.

    python -m components.train --recipe demo train.epochs=2
    torchrun --nproc-per-node 8 -m components.train --recipe strong

From Python (the Prefect flow) ``components.launch.launch_training(cfg)`` starts torchrun with this
module and returns the ``TrainResult``.

``train.global_batch_size`` is the batch of one optimizer step across all ranks. Each rank takes
``global / world_size`` images per step and runs them in forward passes of ``train.micro_batch_size``,
accumulating gradients (``components.trainer.train_step``); with SyncBatchNorm (world size > 1) every
split computes the gradient of one big single-process batch.

Checkpoints (``TrainState.to_checkpoint``, written by rank 0 to ``train.output_dir`` after every epoch)
hold the model, optimizer, LR schedule and progress; a rerun with the same output_dir resumes from the
newest complete one and continues the same MLflow run. Sample order and augmentation are seeded per
(seed, epoch, sample), dropout per (seed, epoch, rank, step), so a resumed run ends with exactly the
weights of an uninterrupted one (on CPU; for GPUs see docs/operations.md). SIGTERM (preemption) stops
all ranks at the same step boundary (one process: the next; several: the next ``train.log_every`` log
point) and exits with code 143; the epoch in progress is redone on resume.

At the end rank 0 writes ``<output_dir>/train_result.json`` (``read_result`` reads it back, local or s3).
Progress for the orchestrator: rank 0 logs an ``EpochProgress`` line at the start and after every epoch,
which the launcher turns into its caller's ``on_epoch`` calls (this module never imports Prefect).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import torch

from components import checkpoint, distributed, storage, tracking
from components.cli import run_cli
from components.config import Config, load_config
from components.data.dataset import CityscapesSegmentation
from components.data.sampling import train_loader
from components.data.transforms import check_crop_fits, eval_transform, train_transform
from components.errors import ConfigError
from components.evaluate import eval_loader, scalar_metrics
from components.train_contract import (
    CollectiveTimeout,
    EpochProgress,
    TrainingInterrupted,
    TrainResult,
    write_result,
)
from components.trainer import (
    BatchPlan,
    build_stepper,
    configure_determinism,
    plan_batches,
    train_one_epoch,
    validate,
)

logger = logging.getLogger(__name__)


def train(cfg: Config) -> TrainResult:
    """Train in this process: one torchrun rank, or a plain process (world size 1)."""
    ctx = distributed.init(cfg.train.collective_timeout_s)
    determinism = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    try:
        with _sigterm_flag() as stop:
            return _train(cfg, ctx, stop)
    except RuntimeError as error:
        if not distributed.is_timeout(error):
            raise
        raise CollectiveTimeout(
            f"CollectiveTimeout: rank {ctx.rank} of {ctx.world_size} waited more than "
            f"train.collective_timeout_s={cfg.train.collective_timeout_s:g} s for the other ranks: one of "
            "them is hung (stopped, deadlocked, stuck on I/O) or gone. "
            f"Rerun to resume from {cfg.train.output_dir}. ({error})"
        ) from error
    finally:
        torch.use_deterministic_algorithms(determinism[0], warn_only=determinism[1])
        distributed.cleanup()


def _train(cfg: Config, ctx: distributed.DistContext, stop: threading.Event) -> TrainResult:
    plan = plan_batches(cfg.train, ctx.world_size)
    device = ctx.device
    cfg = _without_unused_aux_head(cfg)
    configure_determinism(cfg.train, device)
    check_crop_fits(cfg.augment, cfg.data.root)
    train_set = CityscapesSegmentation(
        cfg.data.root,
        "train",
        train_transform(cfg.augment),
        cache_size=cfg.augment.resize if cfg.data.cache else None,
    )
    val_set = CityscapesSegmentation(cfg.data.root, "val", eval_transform(cfg.augment, cfg.evaluate.resize))
    loader = train_loader(cfg, train_set, plan.per_rank, ctx.rank, ctx.world_size, device.type == "cuda")
    if len(loader) == 0:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is larger than the "
            f"{len(train_set)} training images in {cfg.data.root}"
        )
    val_loader = eval_loader(val_set, batch_size=cfg.evaluate.batch_size, num_workers=cfg.data.num_workers)

    stepper = build_stepper(cfg, ctx, plan, len(loader), stop)
    state, raw, ddp = stepper.state, stepper.state.model, stepper.ddp
    saved = _load_resume_state(cfg, ctx)
    if saved is not None:
        state.from_checkpoint(saved)
        logger.info("resuming after epoch %d from %s", state.epoch, cfg.train.output_dir)
        del saved

    with _tracking_run(cfg, ctx, plan, state.run_id) as run:
        state.run_id = run.info.run_id if run is not None else None
        last_checkpoint = storage.join(cfg.train.output_dir, checkpoint.epoch_name(state.epoch))
        progress = _ProgressLog(cfg.train.epochs, state.epoch) if ctx.is_main else None
        with checkpoint.BackgroundSaver() as saver:  # the last write lands before the result
            for epoch in range(state.epoch, cfg.train.epochs):
                loader.sampler.set_epoch(epoch)
                metrics = train_one_epoch(stepper, loader, epoch)
                if metrics is None:
                    raise TrainingInterrupted(
                        f"SIGTERM during epoch {epoch + 1}: stopped; {cfg.train.output_dir} holds the last "
                        f"complete epoch ({epoch}); rerun to resume"
                    )
                state.epoch, state.metrics = epoch + 1, metrics
                if ddp is not None:
                    state.metrics.update(distributed.communication_metrics(ddp))
                is_best, val_miou = False, None
                if state.epoch % cfg.train.val_every == 0 or state.epoch == cfg.train.epochs:
                    val = validate(cfg, raw, val_loader, device)
                    val_miou = val["miou"]
                    state.metrics.update(scalar_metrics(val), per_class_iou=val["per_class_iou"])
                    is_best = val["miou"] > state.best_miou
                    if is_best:
                        state.best_miou, state.best_epoch = val["miou"], state.epoch
                    logger.info(
                        "epoch %d/%d: val mIoU %.4f (best %.4f, epoch %d)",
                        state.epoch,
                        cfg.train.epochs,
                        val["miou"],
                        state.best_miou,
                        state.best_epoch,
                    )
                if ctx.is_main:
                    # Metrics first: a crash in between redoes this epoch on resume (log_epoch skips it).
                    tracking.log_epoch(state.metrics, state.epoch)
                    last_checkpoint = saver.save(
                        state.to_checkpoint(cfg), cfg.train.output_dir, is_best=is_best
                    )
                if progress is not None:
                    progress.epoch_done(state.epoch, state.metrics, val_miou)
                distributed.barrier()
        result = TrainResult(
            best_checkpoint=storage.join(cfg.train.output_dir, checkpoint.BEST),
            last_checkpoint=last_checkpoint,
            best_miou=state.best_miou,
            mlflow_run_id=state.run_id,
            epochs_completed=cfg.train.epochs,
        )
        if ctx.is_main:
            write_result(cfg.train.output_dir, result)
            tracking.log_training_summary({**asdict(result), "best_epoch": state.best_epoch, **state.metrics})
    return result


class _ProgressLog:
    """Rank 0's ``EpochProgress`` lines: one now (``done`` epochs of ``epochs``), one per finished epoch."""

    def __init__(self, epochs: int, done: int) -> None:
        self.epochs, self.first_epoch, self.started = epochs, done, time.perf_counter()
        logger.info("%s", EpochProgress(done, epochs).to_line())

    def epoch_done(self, epoch: int, metrics: dict[str, Any], val_miou: float | None) -> None:
        seconds_per_epoch = (time.perf_counter() - self.started) / (epoch - self.first_epoch)
        progress = EpochProgress(
            epoch,
            self.epochs,
            train_loss=metrics["train_loss"],
            lr=metrics["lr"],
            images_per_second=metrics["images_per_second"],
            val_miou=val_miou,
            eta_s=(self.epochs - epoch) * seconds_per_epoch,
        )
        logger.info("%s", progress.to_line())


def _without_unused_aux_head(cfg: Config) -> Config:
    """With ``train.aux_weight=0`` the auxiliary head is never built: no wasted forward pass, and the
    checkpoint's config says so (``model.aux_loss=false``), so loading and export see the same model."""
    if cfg.train.aux_weight > 0 or not cfg.model.aux_loss:
        return cfg
    logger.info("train.aux_weight=0: training without the auxiliary head (model.aux_loss=false)")
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"aux_loss": False})})


def _load_resume_state(cfg: Config, ctx: distributed.DistContext) -> dict[str, Any] | None:
    """Rank 0 reads the newest complete checkpoint and sends it to the others (output_dir may be local)."""
    state = checkpoint.load_latest_checkpoint(cfg.train.output_dir) if ctx.is_main else None
    if ctx.world_size > 1:
        holder = [state]
        torch.distributed.broadcast_object_list(holder, src=0)
        state = holder[0]
    if state is not None and state.get("config", {}).get("model") != cfg.model.model_dump(mode="json"):
        raise ConfigError(
            f"{cfg.train.output_dir} holds checkpoints of a different model config; use a new "
            "train.output_dir or delete the old checkpoints"
        )
    return state


@contextlib.contextmanager
def _tracking_run(
    cfg: Config, ctx: distributed.DistContext, plan: BatchPlan, run_id: str | None
) -> Iterator[Any]:
    """Rank 0's MLflow run (None on the other ranks)."""
    if not ctx.is_main:
        yield None
        return
    from components.data.prepare import dataset_fingerprint

    tags = {
        "stage": "train",
        "dataset_fingerprint": dataset_fingerprint(cfg.data.root),
        "world_size": str(ctx.world_size),
        "per_rank_batch": str(plan.per_rank),
        "micro_batch": str(plan.micro),
        "grad_accumulation": str(plan.accumulation),
        "device": ctx.device.type,
    }
    with tracking.training_run(cfg, tags, run_id=run_id) as run:
        yield run


@contextlib.contextmanager
def _sigterm_flag() -> Iterator[threading.Event]:
    """An Event set by SIGTERM while training runs (handlers can only be installed in the main thread)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def request_stop(signum: int, _frame: Any) -> None:
        logger.warning("SIGTERM received: stopping at the next step boundary")
        stop.set()

    previous = signal.signal(signal.SIGTERM, request_stop)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Fine-tune DeepLabv3 on Cityscapes (plain process or under torchrun); resumes from "
        "train.output_dir. Exit code 143 = stopped by SIGTERM, rerun to resume."
    )
    parser.add_argument(
        "--recipe", "--config", default="strong", help="recipe name or YAML path (default: strong)"
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=2 data.root=...")
    args = parser.parse_args(argv)

    def body() -> None:
        result = train(load_config(args.recipe, args.overrides))
        if int(os.environ.get("RANK", 0)) == 0:
            print(json.dumps(asdict(result), indent=2))

    rank_format = f"%(asctime)s %(levelname)s [rank {os.environ.get('RANK', 0)}] %(name)s: %(message)s"
    return run_cli(body, rank_format)


if __name__ == "__main__":
    raise SystemExit(main())
