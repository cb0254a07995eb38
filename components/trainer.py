"""The in-rank trainer: what one torchrun rank (or a plain process) holds and does every step.

``TrainState`` is everything a checkpoint restores; ``train_step`` is one optimizer step over this
rank's share of the global batch; ``train_one_epoch`` runs the steps of an epoch; ``validate`` scores the
model. ``components.train`` wires them into the epoch loop with checkpoints and tracking.

Randomness in a rank process is dropout only (augmentation is seeded per sample in the loader, see
``components.data.sampling``). Before every step the global torch RNG is seeded from
(seed, epoch, rank, step), so a step's dropout masks depend on nothing that ran before it: an epoch
redone after a resume repeats the uninterrupted run bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from components import distributed
from components.config import Config, TrainConfig
from components.data.sampling import derived_seed
from components.errors import ConfigError
from components.evaluate import evaluate_model, protocol_name
from components.labels import IGNORE_INDEX
from components.model import build_model
from components.optim import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)


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


@dataclass
class TrainState:
    """The model (unwrapped from DDP), optimizer, LR schedule and progress: what a checkpoint holds."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    epoch: int = 0
    """Completed epochs."""
    best_miou: float = -math.inf
    best_epoch: int = 0
    run_id: str | None = None
    """The MLflow run this training logs to (continued on resume)."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """The last completed epoch's."""

    def to_checkpoint(self, cfg: Config) -> dict[str, Any]:
        """A dict of tensors and plain data (loads with ``weights_only=True``)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "best_miou": self.best_miou,
            "best_epoch": self.best_epoch,
            "config": cfg.model_dump(mode="json"),
            "metrics": self.metrics,
            "mlflow_run_id": self.run_id,
        }

    def from_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore everything ``to_checkpoint`` wrote. No RNG state: every step reseeds (module doc)."""
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.epoch = int(checkpoint["epoch"])
        self.best_miou = float(checkpoint["best_miou"])
        self.best_epoch = int(checkpoint["best_epoch"])
        self.run_id = checkpoint["mlflow_run_id"]
        self.metrics = checkpoint["metrics"]


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    micro_batch: int,
    aux_weight: float = 0.0,
    autocast_dtype: torch.dtype | None = None,
    ddp: DistributedDataParallel | None = None,
) -> torch.Tensor:
    """One optimizer step over this rank's share of the global batch; returns the global batch loss.

    The loss is the sum of per-pixel cross-entropies over the global batch divided by its number of
    valid pixels, so any world size / ``micro_batch`` split computes the gradient of one big batch.
    ``ddp``: the DDP wrapper inside ``model`` (if any), to skip gradient syncs until the last micro-batch.
    The loss comes back as a float64 scalar tensor on the device: nothing here waits for the GPU (no
    ``.item()``), so the host queues the next step while this one runs.
    """
    world = distributed.rank_world()[1]
    valid = distributed.all_reduce_sum((labels != IGNORE_INDEX).sum().to(torch.float64)).clamp(min=1)
    scale = world / valid  # x world: DDP averages the gradients over ranks
    loss_sum = torch.zeros((), dtype=torch.float64, device=labels.device)
    chunks = list(zip(images.split(micro_batch), labels.split(micro_batch), strict=True))
    for index, (image_chunk, label_chunk) in enumerate(chunks):
        last = index == len(chunks) - 1
        with contextlib.nullcontext() if last or ddp is None else ddp.no_sync():
            with torch.autocast(
                image_chunk.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
            ):
                outputs = model(image_chunk)
            loss = pixel_loss_sum(outputs, label_chunk, aux_weight)
            (loss * scale.to(loss.dtype)).backward()
        loss_sum += loss.detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return distributed.all_reduce_sum(loss_sum) / valid


def pixel_loss_sum(outputs: dict[str, torch.Tensor], labels: torch.Tensor, aux_weight: float) -> torch.Tensor:
    """Summed (not averaged) per-pixel cross-entropy, plus ``aux_weight`` x the auxiliary head's.

    bf16 logits are scored in fp32; fp32 and fp64 ones in their own precision.
    """

    def summed(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")

    loss = summed(outputs["out"])
    if aux_weight > 0:
        loss = loss + aux_weight * summed(outputs["aux"])
    return loss


@dataclass
class Stepper:
    """How this rank runs ``train_step``: the (DDP-wrapped, maybe compiled) model and the batch plan."""

    cfg: Config
    ctx: distributed.DistContext
    plan: BatchPlan
    state: TrainState
    model: nn.Module
    ddp: DistributedDataParallel | None
    autocast_dtype: torch.dtype | None
    stop: threading.Event

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One ``train_step`` on a loader batch (non-blocking copies to the device); the loss tensor."""
        device = self.ctx.device
        memory_format = (
            torch.channels_last if uses_channels_last(self.cfg, device) else torch.contiguous_format
        )
        return train_step(
            self.model,
            self.state.optimizer,
            self.state.scheduler,
            images.to(device, non_blocking=True).contiguous(memory_format=memory_format),
            labels.to(device, non_blocking=True),
            micro_batch=self.plan.micro,
            aux_weight=self.cfg.train.aux_weight,
            autocast_dtype=self.autocast_dtype,
            ddp=self.ddp,
        )


def build_stepper(
    cfg: Config, ctx: distributed.DistContext, plan: BatchPlan, steps_per_epoch: int, stop: threading.Event
) -> Stepper:
    """This rank's model (DDP-wrapped for world size > 1, compiled if ``train.compile``), optimizer and
    LR schedule, fresh: ``state.from_checkpoint`` resumes them."""
    raw = build_trainable_model(cfg, ctx.device, ctx.world_size)
    optimizer = build_optimizer(raw, cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.optimizer, cfg.train.epochs * steps_per_epoch)
    model: nn.Module = raw
    ddp = None
    if ctx.world_size > 1:
        device_ids = [ctx.device] if ctx.device.type == "cuda" else None
        model = ddp = DistributedDataParallel(raw, device_ids=device_ids)
    if cfg.train.compile:
        model = torch.compile(model)
    state = TrainState(raw, optimizer, scheduler)
    return Stepper(cfg, ctx, plan, state, model, ddp, autocast_dtype(cfg, ctx.device), stop)


def train_one_epoch(run: Stepper, loader: DataLoader, epoch: int) -> dict[str, float] | None:
    """Train loss, LR and throughput of the epoch; None if SIGTERM (on any rank) stopped it.

    The host reads from the device only every ``train.log_every`` steps and at the epoch's end (the
    logged loss; with several ranks, whether any got SIGTERM): losses add up on the device in between, so
    a GPU is never idle waiting for the host. One process checks its SIGTERM flag before every step.
    """
    cfg, device, steps = run.cfg, run.ctx.device, len(loader)
    run.model.train()
    loss_total = torch.zeros((), dtype=torch.float64, device=device)
    started = time.perf_counter()
    bar = tqdm(
        total=steps,
        desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
        # A terminal only (None): relayed through a pipe, a bar's text lands inside the next log line,
        # and the step lines (loss, img/s, ETA) already say the same.
        disable=None if run.ctx.is_main else True,
        leave=False,
    )
    for step, (images, labels) in enumerate(loader, start=1):
        if run.ctx.world_size == 1 and run.stop.is_set():
            bar.close()
            return None
        torch.manual_seed(derived_seed(cfg.train.seed, epoch, run.ctx.rank, step))  # this step's dropout
        loss = run.step(images, labels)
        loss_total += loss
        bar.update()
        if step % cfg.train.log_every == 0 or step == steps:
            if run.ctx.world_size > 1 and _stop_requested(run):
                bar.close()
                return None
            value = loss.item()  # waits for this step, so the rate below is the device's, not the host's
            elapsed = time.perf_counter() - started
            remaining = (steps - step + (cfg.train.epochs - epoch - 1) * steps) * elapsed / step
            logger.info(
                "epoch %d/%d step %d/%d loss %.4f lr %.3g %.1f img/s ETA %s",
                epoch + 1,
                cfg.train.epochs,
                step,
                steps,
                value,
                run.state.scheduler.get_last_lr()[0],
                step * cfg.train.global_batch_size / elapsed,
                _duration(remaining),
            )
    bar.close()
    train_loss = (loss_total / steps).item()  # waits for the last step: the epoch's time is complete
    return {
        "train_loss": train_loss,
        "lr": float(run.state.scheduler.get_last_lr()[0]),
        "images_per_second": steps * cfg.train.global_batch_size / (time.perf_counter() - started),
    }


def validate(cfg: Config, model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, Any]:
    """Validation metrics of the (unwrapped) model, each rank scoring its shard; identical on all ranks."""
    matrix = evaluate_model(
        model,
        loader,
        num_classes=cfg.model.num_classes,
        device=device,
        resize=cfg.evaluate.resize,
        autocast_dtype=autocast_dtype(cfg, device),
    )
    return {**matrix.compute(), "protocol": protocol_name(cfg.evaluate.resize)}


def build_trainable_model(cfg: Config, device: torch.device, world_size: int) -> nn.Module:
    """The recipe's model with its training-time dropout/BatchNorm settings, SyncBN for world size > 1."""
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
    if cfg.train.dtype == "float64":
        # Inputs (float32 from the loader) follow the parameters, in training and in validation alike.
        model = model.double()
        model.register_forward_pre_hook(lambda _module, args: tuple(a.double() for a in args))
    if uses_channels_last(cfg, device):
        model = model.to(memory_format=torch.channels_last)
    return model


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 autocast (no grad scaler needed: bf16 has fp32's exponent range) or None for fp32."""
    if cfg.train.amp == "bf16" or (cfg.train.amp == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def configure_determinism(train_cfg: TrainConfig, device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not train_cfg.deterministic
        if train_cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if train_cfg.deterministic:
        # Bilinear upsampling has no deterministic CUDA backward: warn there instead of failing.
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")


def uses_channels_last(cfg: Config, device: torch.device) -> bool:
    return cfg.train.channels_last and (device.type == "cuda" or cfg.train.dtype == "float32")


def _stop_requested(run: Stepper) -> bool:
    """True on every rank once any rank got SIGTERM, so all stop at the same step (a host sync: read
    only at log points)."""
    flag = torch.tensor(float(run.stop.is_set()), device=run.ctx.device)
    return bool(distributed.all_reduce_sum(flag).item() > 0)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
