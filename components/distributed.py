"""torch.distributed in a few calls, for one code path from a single CPU process to N nodes x M GPUs.

``torchrun`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (and the rendezvous variables); a plain
``python -m ...`` without them is rank 0 of a world of size 1 and never creates a process group.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None
    """nccl / gloo, or None when there is no process group (world size 1)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class _WarningsOnly(logging.Filter):
    """Ranks other than 0 keep warnings and errors but not the INFO chatter every rank would repeat."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def init(collective_timeout_s: float) -> DistContext:
    """Join the process group torchrun describes (if any) and pick this rank's device. A collective
    that waits longer than ``collective_timeout_s`` for another rank raises (see ``is_timeout``)."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = None
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(
                backend=backend,
                device_id=device if device.type == "cuda" else None,
                timeout=datetime.timedelta(seconds=collective_timeout_s),
            )
    if rank != 0:
        quiet = _WarningsOnly()
        root = logging.getLogger()
        for handler in root.handlers:
            handler.addFilter(quiet)
    logger.info("rank %d/%d on %s (backend %s)", rank, world_size, device, backend or "none")
    return DistContext(rank, local_rank, world_size, device, backend)


_TIMEOUT_MESSAGE = re.compile(r"timed out|timeout", re.IGNORECASE)


def is_timeout(error: BaseException) -> bool:
    """Whether ``error`` is a collective that gave up waiting for another rank. None has a type of its
    own: gloo raises RuntimeErrors ("Timed out waiting 5000ms for recv operation", or "Application timeout
    caused pair closure" when another operation on the connection timed out first), nccl's watchdog a
    DistBackendError, a RuntimeError too ("Watchdog caught collective operation timeout")."""
    return isinstance(error, RuntimeError) and bool(_TIMEOUT_MESSAGE.search(str(error)))


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (a no-op without a process group); returns it."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def communication_metrics(ddp: nn.parallel.DistributedDataParallel) -> dict[str, float]:
    """DDP's own timing of the gradient all-reduce, averaged over the iterations it samples (the first 10,
    then every 100th): compute (forward + backward), communication, the part of it overlapped with the
    backward pass, and ``comm_exposed_share``, the share of the step spent waiting on the network.
    ``_get_ddp_logging_data`` is what DDP's usage logger reports; it has been there since torch 1.9."""
    data = ddp._get_ddp_logging_data()
    if not data.get("avg_backward_comm_time"):
        return {}
    compute = (data["avg_forward_compute_time"] + data["avg_backward_compute_time"]) / 1e6
    comm = data["avg_backward_comm_time"] / 1e6
    exposed = max(0.0, comm - data["avg_backward_compute_comm_overlap_time"] / 1e6)
    return {
        "ddp_compute_ms": compute,
        "ddp_comm_ms": comm,
        "ddp_comm_exposed_ms": exposed,
        "ddp_comm_exposed_share": exposed / (compute + exposed),
    }


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm -> synchronised BatchNorm, so N ranks normalise with the statistics of the global batch."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            # Same parameters and buffers, only forward differs: no state to migrate.
            module.__class__ = CpuSyncBatchNorm2d
    return model


class CpuSyncBatchNorm2d(nn.BatchNorm2d):
    """Synchronised BatchNorm2d for CPU ranks on gloo. torch's SyncBatchNorm is CUDA-only (its kernel
    ``batch_norm_stats`` has no CPU version, and DDP refuses SyncBatchNorm on CPU modules).

    Statistics are summed with the differentiable ``torch.distributed.nn.functional.all_reduce``, whose
    backward all-reduces the gradient, so the result equals BatchNorm over the global batch - the DDP
    test compares it with a single process.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = dist_nn.all_reduce(input.new_tensor([input.numel() / input.size(1)]))
        mean = dist_nn.all_reduce(input.sum(dims)) / count
        centred = input - mean.reshape(shape)
        # Two passes (mean, then squared deviations) for the same accuracy as the single-process kernel.
        var = dist_nn.all_reduce((centred * centred).sum(dims)) / count
        with torch.no_grad():
            self._update_running_stats(mean, var * count / (count - 1).clamp(min=1))
        output = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            output = output * self.weight.reshape(shape) + self.bias.reshape(shape)
        return output

    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        if not self.track_running_stats:
            return
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean, momentum)
        self.running_var.lerp_(unbiased_var, momentum)
