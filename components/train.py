"""Fine-tune DeepLabv3 on Cityscapes: one code path for 1 CPU process, 1 GPU, N GPUs, N nodes.

    python -m components.train --config demo train.epochs=2
    torchrun --nproc-per-node 8 -m components.train --config strong
    launch_training(cfg)            # from Python (the Prefect flow): spawns torchrun, returns TrainResult

``train.global_batch_size`` is the batch of one optimizer step across all ranks. Each rank takes
``global / world_size`` images per step and runs them in forward passes of ``train.micro_batch_size``,
accumulating gradients (DDP syncs only on the last micro-step). The loss is the sum of per-pixel
cross-entropies divided by the number of valid (non-ignore) pixels of the whole global batch, so every
world size / accumulation split gives the gradient of one big single-process batch; with SyncBatchNorm
(world size > 1) the normalisation statistics match too.

Checkpoints (components.checkpoint) are written by rank 0 to ``train.output_dir`` after every epoch; a
rerun with the same output_dir resumes from the newest complete one and continues the same MLflow run.
Every epoch's randomness (sample order, augmentation, dropout) is seeded from (seed, epoch, rank), so a
resumed run repeats exactly what the uninterrupted run would have done. SIGTERM (preemption) stops at
the next step boundary on all ranks and exits with code 143; the epoch in progress is redone on resume.

At the end rank 0 writes ``<output_dir>/train_result.json``; when output_dir is an ``s3://`` prefix a
copy also goes to ``<run_dir>/train_result.json`` (local, which ``launch_training`` reads).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm import tqdm

from components import checkpoint, distributed, storage, tracking
from components.config import AugmentConfig, Config, TrainConfig, load_config
from components.data import dataset as dataset_module
from components.data.layout import IMAGE_SUFFIX, read_png_header
from components.data.transforms import eval_transform, train_transform
from components.errors import CitysegError, ConfigError
from components.evaluate import eval_loader, evaluate_model, mlflow_metrics, protocol_name
from components.labels import IGNORE_INDEX
from components.model import build_model
from components.optim import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)

RESULT_FILE = "train_result.json"
CONFIG_FILE = "train_config.yaml"
INTERRUPTED_EXIT_CODE = 143  # 128 + SIGTERM, what a preempted job conventionally reports


class TrainingError(CitysegError):
    """Training did not complete; ``exit_code`` is the training process's (143 = preempted)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class TrainingInterrupted(TrainingError):
    """SIGTERM stopped training; the last complete epoch is checkpointed and a rerun resumes from it."""

    def __init__(self, message: str) -> None:
        super().__init__(message, INTERRUPTED_EXIT_CODE)


@dataclass
class TrainResult:
    best_checkpoint: str
    last_checkpoint: str
    best_miou: float
    mlflow_run_id: str | None
    epochs_completed: int


@dataclass(frozen=True)
class BatchPlan:
    per_rank: int
    """Images each rank contributes to one optimizer step."""
    micro: int
    """Images per forward pass."""
    accumulation: int
    """Forward/backward passes per optimizer step."""


def plan_batches(train_cfg: TrainConfig, world_size: int) -> BatchPlan:
    """Derive the per-rank batch and accumulation steps from the global batch; refuse uneven splits."""
    global_batch = train_cfg.global_batch_size
    if global_batch % world_size:
        raise ConfigError(
            f"train.global_batch_size={global_batch} is not divisible by the world size {world_size}: "
            f"choose a multiple of {world_size} or change the number of processes"
        )
    per_rank = global_batch // world_size
    micro = min(train_cfg.micro_batch_size or per_rank, per_rank)
    if per_rank % micro:
        raise ConfigError(
            f"train.micro_batch_size={micro} does not divide the per-rank batch {per_rank} "
            f"(train.global_batch_size={global_batch} / world size {world_size}): use a divisor of {per_rank}"
        )
    return BatchPlan(per_rank, micro, per_rank // micro)


def result_path(cfg: Config) -> Path:
    """Where ``launch_training`` finds the TrainResult: in output_dir, or run_dir for s3 output."""
    base = cfg.run_dir if storage.is_s3(cfg.train.output_dir) else cfg.train.output_dir
    return Path(base) / RESULT_FILE


def train(cfg: Config) -> TrainResult:
    """Train in this process: one torchrun rank, or a plain process (world size 1)."""
    ctx = distributed.init()
    determinism = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    try:
        with _sigterm_flag() as stop:
            return _train(cfg, ctx, stop)
    finally:
        torch.use_deterministic_algorithms(determinism[0], warn_only=determinism[1])
        distributed.cleanup()


def launch_training(cfg: Config, nproc: int | None = None) -> TrainResult:
    """Run ``torchrun -m components.train`` on this node (one process per visible GPU, or 1 on CPU).

    Output is streamed to this module's logger; a non-zero exit raises TrainingError with the exit code
    and the last lines (a preempted run can simply be launched again: it resumes).
    """
    nproc = nproc or max(1, torch.cuda.device_count())
    config_path = Path(cfg.run_dir) / CONFIG_FILE
    with storage.atomic_path(config_path) as tmp:
        tmp.write_text(cfg.to_yaml())
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--standalone",
        "-m",
        "components.train",
        "--config",
        str(config_path),
    ]
    package_parent = str(Path(__file__).resolve().parent.parent)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")])),
        # Piped output is read line by line: keep progress bars from flooding it.
        "TQDM_MININTERVAL": os.environ.get("TQDM_MININTERVAL", "30"),
        # Spinning OpenMP threads make CPU training several times slower whenever the cores are shared
        # (MobileNet, batch 8, 2 busy cores: 6.5 s/step spinning, 2.0 s passive); no effect on GPU work.
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
    }
    logger.info("launching %s", " ".join(command))
    tail: collections.deque[str] = collections.deque(maxlen=20)
    # torchrun's own failure report is long enough to push the ranks' error messages out of the tail.
    errors: collections.deque[str] = collections.deque(maxlen=10)
    with (
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env
        ) as process,
        _forward_sigterm(process),
    ):
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip()
            if not line.strip():  # what a closing progress bar leaves behind
                continue
            tail.append(line)
            if " ERROR " in line or "Error:" in line:
                errors.append(line)
            logger.info("%s", line)
        exit_code = process.wait()
    if exit_code != 0:
        raise TrainingError(
            f"training exited with code {exit_code} ({' '.join(command)}); rerunning with the same "
            f"train.output_dir={cfg.train.output_dir} resumes from its last checkpoint.\nErrors:\n"
            + "\n".join(errors)
            + "\nLast output:\n"
            + "\n".join(tail),
            exit_code,
        )
    path = result_path(cfg)
    if not path.is_file():
        raise TrainingError(f"training exited cleanly but wrote no {path}")
    return TrainResult(**json.loads(path.read_text()))


# --------------------------------------------------------------------------------------------------


def _train(cfg: Config, ctx: distributed.DistContext, stop: threading.Event) -> TrainResult:
    plan = plan_batches(cfg.train, ctx.world_size)
    device = ctx.device
    cfg = _without_unused_aux_head(cfg)
    _configure_determinism(cfg.train, device)
    check_crop_fits(cfg.augment, cfg.data.root)
    train_set = dataset_module.CityscapesSegmentation(
        cfg.data.root,
        "train",
        train_transform(cfg.augment),
        cache_size=cfg.augment.resize if cfg.data.cache else None,
    )
    val_set = dataset_module.CityscapesSegmentation(
        cfg.data.root, "val", eval_transform(cfg.augment, cfg.evaluate.resize)
    )
    loader = train_loader(cfg, train_set, plan.per_rank, ctx.rank, ctx.world_size, device.type == "cuda")
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is larger than the "
            f"{len(train_set)} training images in {cfg.data.root}"
        )
    val_loader = eval_loader(val_set, batch_size=cfg.evaluate.batch_size, num_workers=cfg.data.num_workers)

    raw = _build_trainable_model(cfg, device, ctx.world_size)
    optimizer = build_optimizer(raw, cfg.optimizer, device)
    scheduler = build_scheduler(optimizer, cfg.optimizer, cfg.train.epochs * steps_per_epoch)
    progress = _Progress(start_epoch=0, best_miou=-math.inf, best_epoch=0, run_id=None, metrics={})
    state = _load_resume_state(cfg, ctx)
    if state is not None:
        raw.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        progress = _Progress(
            start_epoch=int(state["epoch"]),
            best_miou=float(state["best_miou"]),
            best_epoch=int(state["best_epoch"]),
            run_id=state["mlflow_run_id"],
            metrics=state["metrics"],
        )
        logger.info("resuming after epoch %d from %s", progress.start_epoch, cfg.train.output_dir)
        del state

    model: nn.Module = raw
    if ctx.world_size > 1:
        model = DistributedDataParallel(raw, device_ids=[device] if device.type == "cuda" else None)
    ddp = model
    if cfg.train.compile:
        model = torch.compile(model)

    loop = _Loop(cfg, ctx, plan, model, ddp, optimizer, scheduler, _autocast_dtype(cfg, device), stop)
    tracking_run = _tracking_run(cfg, ctx, plan, progress.run_id) if ctx.is_main else contextlib.nullcontext()
    with tracking_run as run:
        run_id = run.info.run_id if run is not None else None
        last_metrics = progress.metrics
        last_checkpoint = storage.join(cfg.train.output_dir, checkpoint.epoch_name(progress.start_epoch))
        for epoch in range(progress.start_epoch, cfg.train.epochs):
            loader.sampler.set_epoch(epoch)
            _seed_epoch(cfg.train.seed, epoch, ctx.rank)
            epoch_metrics = loop.train_epoch(loader, epoch, steps_per_epoch)
            if epoch_metrics is None:
                raise TrainingInterrupted(
                    f"SIGTERM during epoch {epoch + 1}: stopped; {cfg.train.output_dir} holds the last "
                    f"complete epoch ({epoch}); rerun to resume"
                )
            last_metrics = epoch_metrics
            is_best = False
            if (epoch + 1) % cfg.train.val_every == 0 or epoch + 1 == cfg.train.epochs:
                val = _validate(cfg, raw, val_loader, device, loop.autocast_dtype)
                last_metrics.update(mlflow_metrics(val))
                last_metrics["per_class_iou"] = val["per_class_iou"]
                is_best = val["miou"] > progress.best_miou
                if is_best:
                    progress.best_miou, progress.best_epoch = val["miou"], epoch + 1
                logger.info(
                    "epoch %d/%d: val mIoU %.4f (best %.4f, epoch %d)",
                    epoch + 1,
                    cfg.train.epochs,
                    val["miou"],
                    progress.best_miou,
                    progress.best_epoch,
                )
            if ctx.is_main:
                # Metrics first: a crash in between makes a resume log this epoch twice, never zero times.
                scalars = {k: float(v) for k, v in last_metrics.items() if k != "per_class_iou"}
                mlflow.log_metrics(scalars, step=epoch + 1)
                last_checkpoint = _save(
                    cfg, raw, optimizer, scheduler, epoch + 1, progress, run_id, last_metrics, is_best
                )
            distributed.barrier()
        result = TrainResult(
            best_checkpoint=storage.join(cfg.train.output_dir, checkpoint.BEST),
            last_checkpoint=last_checkpoint,
            best_miou=progress.best_miou,
            mlflow_run_id=run_id,
            epochs_completed=cfg.train.epochs,
        )
        if ctx.is_main:
            _write_result(cfg, result)
            final = {**asdict(result), "best_epoch": progress.best_epoch, **last_metrics}
            mlflow.log_dict(final, "metrics.json")
    return result


def train_loader(
    cfg: Config,
    train_set: dataset_module.CityscapesSegmentation,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    """This rank's shuffled, augmented batches; ``loader.sampler.set_epoch(epoch)`` before each epoch.

    Every sample's augmentation is seeded from (train.seed, epoch, sample index), so the batches depend
    neither on ``data.num_workers`` nor on the world size, and a resumed epoch replays them exactly.
    """
    sampler = _SeededSampler(
        DistributedSampler(
            train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.train.seed, drop_last=True
        ),
        cfg.train.seed,
    )
    workers = cfg.data.num_workers
    return DataLoader(
        _SeededSamples(train_set),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=True,
        # Workers live for the whole run instead of being re-spawned every epoch; seeded per sample,
        # they need no reseeding.
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=dataset_module.worker_init_fn,
    )


@dataclass
class _Progress:
    start_epoch: int
    best_miou: float
    best_epoch: int
    run_id: str | None
    metrics: dict[str, Any]
    """The last completed epoch's."""


class _Loop:
    """One epoch of optimizer steps (with accumulation), loss and throughput bookkeeping."""

    def __init__(
        self,
        cfg: Config,
        ctx: distributed.DistContext,
        plan: BatchPlan,
        model: nn.Module,
        ddp: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        autocast_dtype: torch.dtype | None,
        stop: threading.Event,
    ) -> None:
        self.cfg, self.ctx, self.plan = cfg, ctx, plan
        self.model, self.ddp = model, ddp
        self.optimizer, self.scheduler = optimizer, scheduler
        self.autocast_dtype = autocast_dtype
        self.stop = stop
        self.memory_format = (
            torch.channels_last
            if cfg.train.channels_last and ctx.device.type == "cuda"
            else torch.contiguous_format
        )

    def train_epoch(self, loader: DataLoader, epoch: int, steps: int) -> dict[str, Any] | None:
        """Train loss, LR and throughput of the epoch; None if SIGTERM stopped it."""
        cfg, device = self.cfg, self.ctx.device
        self.model.train()
        losses: list[float] = []
        started = time.perf_counter()
        bar = tqdm(
            total=steps,
            desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
            disable=not self.ctx.is_main,
            leave=False,
        )
        for step, (images, labels) in enumerate(loader, start=1):
            if self._stop_requested():
                bar.close()
                return None
            images = images.to(device, non_blocking=True).contiguous(memory_format=self.memory_format)
            labels = labels.to(device, non_blocking=True)
            losses.append(self._step(images, labels))
            bar.update()
            if step % cfg.train.log_every == 0 or step == steps:
                elapsed = time.perf_counter() - started
                remaining = (steps - step + (cfg.train.epochs - epoch - 1) * steps) * elapsed / step
                logger.info(
                    "epoch %d/%d step %d/%d loss %.4f lr %.3g %.1f img/s ETA %s",
                    epoch + 1,
                    cfg.train.epochs,
                    step,
                    steps,
                    losses[-1],
                    self.scheduler.get_last_lr()[0],
                    step * cfg.train.global_batch_size / elapsed,
                    _duration(remaining),
                )
        bar.close()
        if self._stop_requested():
            return None
        elapsed = time.perf_counter() - started
        return {
            "train_loss": float(np.mean(losses)),
            "lr": float(self.scheduler.get_last_lr()[0]),
            "images_per_second": len(losses) * cfg.train.global_batch_size / elapsed,
        }

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """One optimizer step over this rank's share of the global batch; returns the global batch loss."""
        world = self.ctx.world_size
        valid = distributed.all_reduce_sum((labels != IGNORE_INDEX).sum().to(torch.float64))
        # Sum-of-pixel losses / global valid pixels; x world because DDP averages gradients over ranks.
        scale = world / valid.clamp(min=1).item()
        loss_sum = torch.zeros((), dtype=torch.float64, device=labels.device)
        chunks = list(zip(images.split(self.plan.micro), labels.split(self.plan.micro), strict=True))
        for index, (image_chunk, label_chunk) in enumerate(chunks):
            last = index == len(chunks) - 1
            sync = contextlib.nullcontext() if last or world == 1 else self.ddp.no_sync()
            with sync:
                with torch.autocast(
                    image_chunk.device.type,
                    dtype=self.autocast_dtype,
                    enabled=self.autocast_dtype is not None,
                ):
                    outputs = self.model(image_chunk)
                loss = _pixel_loss_sum(outputs, label_chunk, self.cfg.train.aux_weight)
                (loss * scale).backward()
            loss_sum += loss.detach()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return (distributed.all_reduce_sum(loss_sum) / valid.clamp(min=1)).item()

    def _stop_requested(self) -> bool:
        """True on every rank once any rank got SIGTERM, so all stop at the same step."""
        flag = torch.tensor(float(self.stop.is_set()), device=self.ctx.device)
        return bool(distributed.all_reduce_sum(flag).item() > 0)


def _validate(
    cfg: Config,
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
) -> dict[str, Any]:
    """Validation metrics of the (unwrapped) model, each rank scoring its shard; identical on all ranks."""
    matrix = evaluate_model(
        model,
        loader,
        num_classes=cfg.model.num_classes,
        device=device,
        resize=cfg.evaluate.resize,
        autocast_dtype=autocast_dtype,
    )
    return {**matrix.compute(), "protocol": protocol_name(cfg.evaluate.resize)}


def _pixel_loss_sum(
    outputs: dict[str, torch.Tensor], labels: torch.Tensor, aux_weight: float
) -> torch.Tensor:
    """Summed (not averaged) per-pixel cross-entropy, plus ``aux_weight`` x the auxiliary head's."""
    loss = F.cross_entropy(outputs["out"].float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if aux_weight > 0:
        aux = F.cross_entropy(outputs["aux"].float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
        loss = loss + aux_weight * aux
    return loss


def _build_trainable_model(cfg: Config, device: torch.device, world_size: int) -> nn.Module:
    # Same seed on every rank: identical initial heads (DDP would broadcast rank 0's anyway).
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    has_aux = getattr(model, "aux_classifier", None) is not None
    if cfg.train.aux_weight > 0 and not has_aux:
        raise ConfigError(
            f"train.aux_weight={cfg.train.aux_weight} needs the auxiliary head: set model.aux_loss=true "
            "or train.aux_weight=0"
        )
    if cfg.train.head_dropout is not None:
        for module in model.modules():
            if isinstance(module, nn.Dropout):  # only the heads have dropout in these backbones
                module.p = cfg.train.head_dropout
    if cfg.train.bn_momentum is not None:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = cfg.train.bn_momentum
    if world_size > 1:
        model = distributed.convert_sync_batchnorm(model, device)
    model = model.to(device)
    if cfg.train.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def _autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 autocast (no grad scaler needed: bf16 has fp32's exponent range) or None for fp32."""
    if cfg.train.amp == "bf16" or (cfg.train.amp == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _configure_determinism(train_cfg: TrainConfig, device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not train_cfg.deterministic
        if train_cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if train_cfg.deterministic:
        # Bilinear upsampling has no deterministic CUDA backward: warn there instead of failing.
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")


def _derived_seed(*entropy: int) -> int:
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed this process's randomness (dropout) from (seed, epoch, rank) alone, so a resume replays it."""
    epoch_seed = _derived_seed(seed, epoch, rank)
    torch.manual_seed(epoch_seed)
    random.seed(epoch_seed)
    np.random.seed(epoch_seed)


class _SeededSampler(Sampler):
    """Yields ``(index, seed)``: each sample's augmentation seed derives from (seed, epoch, index).

    The seed travels with the index to whichever (persistent) worker loads the sample, so augmentation
    depends neither on the number of workers nor on the world size, and a resumed epoch replays it.
    """

    def __init__(self, sampler: DistributedSampler, seed: int) -> None:
        self.sampler, self.seed, self.epoch = sampler, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.sampler:
            yield index, _derived_seed(self.seed, self.epoch, index)


class _SeededSamples(Dataset):
    """The training set indexed by ``(index, seed)``: seeds the augmentation pipeline, then loads."""

    def __init__(self, dataset: dataset_module.CityscapesSegmentation) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key
        self.dataset.transform.set_random_seed(seed)
        return self.dataset[index]


def check_crop_fits(augment: AugmentConfig, data_root: str | Path) -> None:
    """Refuse a random crop larger than the (resized, most upscaled) training images, before any work.

    Without ``augment.resize`` the size is read from the first training image's PNG header (Cityscapes
    frames all have one size); a missing split is left to the dataset's own check.
    """
    if augment.crop is None:
        return
    if augment.resize is not None:
        base, source = augment.resize, f"augment.resize={list(augment.resize)}"
    else:
        first_image = next(
            iter(sorted(Path(data_root, "leftImg8bit", "train").glob(f"*/*{IMAGE_SUFFIX}"))), None
        )
        if first_image is None:
            return
        header = read_png_header(first_image)
        base, source = (
            (header.height, header.width),
            f"{first_image} is {header.width}x{header.height} pixels",
        )
    max_scale = augment.scale_range[1] if augment.scale_range is not None else 1.0
    largest = (math.floor(base[0] * max_scale), math.floor(base[1] * max_scale))
    crop_height, crop_width = augment.crop
    if crop_height > largest[0] or crop_width > largest[1]:
        raise ConfigError(
            f"augment.crop={list(augment.crop)} (height, width) is larger than the training images "
            f"can give: {source}, so scaled by at most {max_scale} they are at most "
            f"[{largest[0]}, {largest[1]}] (height, width); the rest of each crop would be padding. "
            "Choose a smaller augment.crop (or a larger augment.scale_range / augment.resize)"
        )


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


def _save(
    cfg: Config,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epoch: int,
    progress: _Progress,
    run_id: str | None,
    metrics: dict[str, Any],
    is_best: bool,
) -> str:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "best_miou": progress.best_miou,
        "best_epoch": progress.best_epoch,
        # Provenance only: resumption reseeds from (seed, epoch, rank) rather than restoring these.
        "rng": _rng_state(),
        "config": cfg.model_dump(mode="json"),
        "metrics": metrics,
        "mlflow_run_id": run_id,
    }
    return checkpoint.save_checkpoint(state, cfg.train.output_dir, is_best=is_best)


def _rng_state() -> dict[str, Any]:
    """RNG states as tensors and lists (checkpoints load with weights_only=True)."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": position,
            "has_gauss": has_gauss,
            "cached_gaussian": cached_gaussian,
        },
        "python": [version, list(python_state), gauss_next],
    }


def _write_result(cfg: Config, result: TrainResult) -> None:
    payload = json.dumps(asdict(result), indent=2).encode()
    storage.write_bytes(storage.join(cfg.train.output_dir, RESULT_FILE), payload)
    if storage.is_s3(cfg.train.output_dir):
        storage.write_bytes(result_path(cfg), payload)


@contextlib.contextmanager
def _tracking_run(
    cfg: Config, ctx: distributed.DistContext, plan: BatchPlan, run_id: str | None
) -> Iterator[Any]:
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
    with tracking.mlflow_run(cfg, f"train-{cfg.recipe}-{cfg.model.backbone}", tags, run_id=run_id) as run:
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


@contextlib.contextmanager
def _forward_sigterm(process: subprocess.Popen) -> Iterator[None]:
    """Pass a SIGTERM sent to us (e.g. a pod's PID 1) on to torchrun, which passes it to every rank."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: process.send_signal(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Fine-tune DeepLabv3 on Cityscapes (plain process or under torchrun); resumes from "
        "train.output_dir. Exit code 143 = stopped by SIGTERM, rerun to resume."
    )
    parser.add_argument("--config", default="strong", help="recipe name or YAML path (default: strong)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=2 data.root=...")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s [rank {os.environ.get('RANK', 0)}] %(name)s: %(message)s",
    )
    try:
        cfg = load_config(args.config, args.overrides)
        result = train(cfg)
    except TrainingInterrupted as exc:
        logger.warning("%s", exc)
        return exc.exit_code
    except CitysegError as exc:
        logger.error("%s", exc)
        return 1
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(asdict(result), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
