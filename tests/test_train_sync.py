"""No host synchronisation per training step: the trainer reads tensors only at log points.

On a GPU a host read (``.item()``, ``bool(tensor)``, ``.cpu()``, ...) waits for every queued kernel, so
the host stops queueing the next step. CPU tensors never wait, but the calls are the same: a
``TorchFunctionMode`` sees each one, and where in ``train_one_epoch`` it came from. (On a GPU,
``python -m bench.gpu_check`` checks the same with ``torch.cuda.set_sync_debug_mode``.)
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from components import distributed
from components.config import load_config
from components.data.dataset import CityscapesSegmentation
from components.data.sampling import train_loader
from components.data.transforms import train_transform
from components.trainer import build_stepper, plan_batches, train_one_epoch
from tests.conftest import prepared_synthetic

TORCH_DIR = str(Path(torch.__file__).parent)
LOADER_DIR = str(Path(torch.utils.data.__file__).parent)
HOST_READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
    torch.Tensor.__array__,
    torch.Tensor.nonzero,
    torch.Tensor.any,
    torch.Tensor.all,
    torch.Tensor.equal,
    torch.equal,
    torch.allclose,
    torch.Tensor.allclose,
    torch.nonzero,
}
"""Calls that return host values computed from a tensor's data (or, like nonzero, whose output shape
depends on it): each one waits for a GPU."""


class HostReads(TorchFunctionMode):
    """Records (step, caller) of every host read made while ``watched`` (its local ``step``) runs."""

    def __init__(self, watched: Callable[..., Any] = train_one_epoch) -> None:
        super().__init__()
        self.code = watched.__code__
        self.reads: list[tuple[int, str]] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        # The DataLoader reads its own CPU tensors (the workers' base seed): never a wait for a GPU.
        if func in HOST_READS and not sys._getframe(1).f_code.co_filename.startswith(LOADER_DIR):
            watched_frame = _frame_of(self.code)
            if watched_frame is not None:
                self.reads.append((watched_frame.f_locals["step"], _caller()))
        return func(*args, **(kwargs or {}))


def _frame_of(code: Any) -> FrameType | None:
    frame = sys._getframe(2)
    while frame is not None and frame.f_code is not code:
        frame = frame.f_back
    return frame


def _caller() -> str:
    """The innermost function outside torch: who asked for the host value."""
    frame = sys._getframe(2)  # above this and __torch_function__
    while frame.f_code.co_filename.startswith(TORCH_DIR):
        frame = frame.f_back
    return frame.f_code.co_name


def test_an_epoch_reads_tensors_on_the_host_only_at_log_points(tmp_path: Path) -> None:
    # 16 frames in batches of 4 (2 micro-batches of 2): 4 steps; a log line every 3 steps: log points 3
    # and 4 (the last).
    root = prepared_synthetic(tmp_path / "data", train=16, val=1, height=64, width=128)
    cfg = load_config(
        "demo",
        [
            f"data.root={root}",
            "data.num_workers=0",
            "augment.crop=[64, 128]",
            "model.backbone=mobilenet_v3_large",
            "model.weights=none",
            "train.global_batch_size=4",
            "train.micro_batch_size=2",
            "train.log_every=3",
            "train.epochs=1",
            f"train.output_dir={tmp_path / 'train'}",
        ],
    )
    assert cfg.optimizer.fused and cfg.train.head_dropout  # as trained: fused optimizer, dropout
    ctx = distributed.DistContext(0, 0, 1, torch.device("cpu"), None)
    plan = plan_batches(cfg.train, 1)
    dataset = CityscapesSegmentation(cfg.data.root, "train", train_transform(cfg.augment))
    loader = train_loader(cfg, dataset, plan.per_rank)
    stepper = build_stepper(cfg, ctx, plan, len(loader), threading.Event())
    loader.sampler.set_epoch(0)
    assert len(loader) == 4 and plan.accumulation == 2

    with HostReads() as mode:
        metrics = train_one_epoch(stepper, loader, 0)

    assert metrics is not None and metrics["train_loss"] > 0
    # The logged loss at steps 3 and 4, then the epoch's mean loss: nothing else, and nothing from
    # inside train_step (model, loss, gradient accumulation, optimizer, LR schedule).
    assert mode.reads == [(3, "train_one_epoch"), (4, "train_one_epoch"), (4, "train_one_epoch")]


def test_the_counter_sees_reads_anywhere_inside_the_watched_function() -> None:
    """A host read hidden in a helper is recorded with its step and caller: the test above can fail."""
    loss = torch.ones(())

    def epoch() -> None:
        def helper() -> None:
            loss.item()

        for step in (1, 2):  # read through the frame
            helper()
            if step == 2:
                bool(loss > 0)
                float(loss)

    with HostReads(epoch) as mode:
        loss.item()  # outside the watched function: not recorded
        epoch()
    assert mode.reads == [(1, "helper"), (2, "helper"), (2, "epoch"), (2, "epoch")]
