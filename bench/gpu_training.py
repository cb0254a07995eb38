"""GPU training throughput at 768x1024, DeepLabv3-ResNet50: the paper's setup vs ours, one GPU.

Paper: fp32, ``nn.DataParallel``, default DataLoader (shuffle, ``num_workers=0``) over the paper's
pipeline (PIL decode of the full PNG + Resize/HFlip/Normalize every step), Adam.
Ours: DDP, bf16 autocast, channels_last, fused Adam (``components.optim``), optionally ``torch.compile``,
the decode-once cache with worker processes, pinned memory, persistent workers and prefetching.

Both run the trainer's own ``components.trainer.train_step`` (the paper setup with its fp32,
``nn.DataParallel`` and plain Adam) on the paper recipe's model (19-class heads, loss on ``out`` only,
random weights: the speed does not depend on them) with its batch of 24 on one GPU, and are measured
twice: end to end (input pipeline included) and step only (one batch kept on the GPU), images/s and
peak memory. A batch that does not fit is split into micro-batches with gradient accumulation
(reported). ``tests/test_bench.py`` runs this code on CPU at toy size.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, RandomSampler

from bench.common import Row, not_run
from bench.input_pipeline import PaperDataset, paper_transform
from components.config import Config, load_config
from components.data.dataset import CityscapesSegmentation, worker_init_fn
from components.data.transforms import train_transform
from components.optim import build_optimizer
from components.trainer import autocast_dtype, build_trainable_model, train_step, uses_channels_last

logger = logging.getLogger(__name__)

WHAT = "GPU training, paper recipe (DeepLabv3-ResNet50 768x1024 batch 24)"
TARGET = (">=", 100.0)
"""images/s end to end: 20 epochs of 2,975 images in under 10 minutes."""


@dataclass
class Measurement:
    images_per_second: float
    peak_memory_gib: float
    micro_batch: int
    profile: str = ""
    """torch.profiler's top CUDA kernels over two steps (step-only measurements on CUDA)."""


def bench_gpu_training(
    root: Path,
    *,
    steps: int = 15,
    warmup: int = 3,
    compile_model: bool = False,
    device: str | None = None,
    overrides: tuple[str, ...] = (),
    profile_path: Path | None = None,
) -> list[Row]:
    """Rows for end-to-end and step-only throughput; a single "not run" row without CUDA.

    ``profile_path``: where torch.profiler's kernel tables of the step-only runs go (CUDA only).
    ``device`` and ``overrides`` (config overrides of the paper recipe) exist for trying the harness
    on CPU at toy sizes; the benchmark itself runs on ``cuda`` with the paper recipe as it is.
    """
    if device is None:
        if not torch.cuda.is_available():
            return [not_run(WHAT, "images/s", "no GPU lent", f">= {TARGET[1]:g} images/s")]
        device = "cuda"
    cfg = load_config("paper", ["model.weights=none", *overrides])
    results: dict[str, Measurement] = {}
    # cuDNN autotuning exists on CUDA only: elsewhere that setup would repeat "ours".
    setups = ("paper", "ours", "ours+autotune") if device == "cuda" else ("paper", "ours")
    runs = [(setup, mode) for setup in setups for mode in ("end to end", "step only")]
    if compile_model:  # compiling takes minutes: end to end only
        runs.append(("ours+autotune+compile", "end to end"))
    failures = []
    with _process_group(torch.device(device)):
        for setup, mode in runs:
            logger.info("GPU training: %s setup, %s", setup, mode)
            try:
                results[f"{setup}|{mode}"] = _measure(
                    cfg, root, torch.device(device), setup, mode == "step only", steps, warmup
                )
            except Exception as exc:  # keep the other measurements; the failure becomes a row
                if "compile" not in setup:
                    raise
                logger.exception("torch.compile measurement failed")
                failures.append(not_run(f"{WHAT}, compiled", "images/s", f"{type(exc).__name__}: {exc}"))
    name = torch.cuda.get_device_name(0) if device == "cuda" else device
    what = f"GPU training, DeepLabv3-{cfg.model.backbone} {_size(cfg)} batch {cfg.train.global_batch_size}"
    rows = []
    for key, ours in results.items():
        setup, mode = key.split("|")
        if setup != "paper":
            paper = results[f"paper|{mode}"]
            e2e = mode == "end to end"
            rows.append(
                Row(
                    what=f"{what}, {mode} ({setup} vs paper setup)",
                    unit="images/s",
                    ours=ours.images_per_second,
                    reference=paper.images_per_second,
                    ratio=ours.images_per_second / paper.images_per_second,
                    identical=None,
                    target=f">= {TARGET[1]:g} images/s" if e2e else "",
                    met=ours.images_per_second >= TARGET[1] if e2e else None,
                    notes=(
                        f"{name}; peak memory {ours.peak_memory_gib:.1f} vs {paper.peak_memory_gib:.1f} GiB; "
                        f"micro-batch {ours.micro_batch} vs {paper.micro_batch}; "
                        f"20 epochs x 2,975 images: {_minutes(ours)} vs {_minutes(paper)} min"
                    ),
                )
            )
    if profile_path is not None:
        profile_path.write_text(
            "".join(f"## {key}\n\n{m.profile}\n" for key, m in results.items() if m.profile)
        )
    return rows + failures


def _size(cfg: Config) -> str:
    height, width = cfg.augment.resize
    return f"{height}x{width}"


def _minutes(measurement: Measurement) -> str:
    return f"{20 * 2975 / measurement.images_per_second / 60:.1f}"


def _measure(
    cfg: Config, root: Path, device: torch.device, setup: str, step_only: bool, steps: int, warmup: int
) -> Measurement:
    """images/s over ``steps`` optimizer steps after ``warmup``; halves the micro-batch on OOM."""
    micro = cfg.train.global_batch_size
    while True:
        try:
            return _run(cfg, root, device, setup, step_only, steps, warmup, micro)
        except torch.OutOfMemoryError:
            if micro == 1:
                raise
            micro //= 2
            logger.warning("%s setup out of memory: micro-batch %d with accumulation", setup, micro)
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _run(
    cfg: Config,
    root: Path,
    device: torch.device,
    setup: str,
    step_only: bool,
    steps: int,
    warmup: int,
    micro: int,
) -> Measurement:
    ours = setup.startswith("ours")
    batch = cfg.train.global_batch_size
    # The trainer's own model set-up (seeded, dropout/BatchNorm settings); channels_last for ours only.
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"channels_last": ours})})
    model = build_trainable_model(cfg, device, world_size=1)
    memory_format = torch.channels_last if uses_channels_last(cfg, device) else torch.contiguous_format
    # "autotune" = train.deterministic=false: cuDNN picks the fastest kernels (components.train does too).
    torch.backends.cudnn.benchmark = "autotune" in setup
    ddp: DistributedDataParallel | None = None
    if ours:
        optimizer = build_optimizer(model, cfg.optimizer)
        ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        net: nn.Module = ddp
        if "compile" in setup:
            net = torch.compile(net)
        autocast = autocast_dtype(cfg, device)  # the trainer's: bf16 on CUDA
    else:  # the paper's: plain Adam, nn.DataParallel, fp32
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optimizer.lr)
        net = nn.DataParallel(model)
        autocast = None
    model.train()

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        train_step(
            net,
            optimizer,
            None,
            images,
            labels,
            micro_batch=micro,
            aux_weight=cfg.train.aux_weight,
            autocast_dtype=autocast,
            ddp=ddp,
        )

    batches = _batches(cfg, root, ours, batch, steps + warmup + 2, step_only)
    for _ in range(warmup):
        step(*next(batches))
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step(*next(batches))
    _synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    profile = ""
    if step_only and device.type == "cuda":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                step(*next(batches))
            _synchronize(device)
        profile = prof.key_averages().table(
            sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=70
        )
    return Measurement(steps * batch / seconds, peak, micro, profile)


def _batches(
    cfg: Config, root: Path, ours: bool, batch: int, count: int, step_only: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    size = cfg.augment.resize
    if ours:
        dataset = CityscapesSegmentation(root, "train", train_transform(cfg.augment), cache_size=size)
        workers = min(8, max(1, len(os.sched_getaffinity(0)) - 2))
        options = {
            "num_workers": workers,
            "pin_memory": True,
            "persistent_workers": True,
            "prefetch_factor": 4,
            "worker_init_fn": worker_init_fn,
        }
    else:
        ref = CityscapesSegmentation(root, "train")  # only for its validated file lists
        dataset = PaperDataset(ref.image_paths, ref.label_paths, paper_transform(size))
        options = {}
    # Shuffled like DataLoader(shuffle=True), but as many samples as the measurement needs.
    sampler = RandomSampler(dataset, num_samples=batch * (1 if step_only else count))
    loader = DataLoader(dataset, batch, sampler=sampler, drop_last=True, **options)
    if step_only:
        fixed = next(iter(loader))
        return _repeat(lambda: fixed, count)
    return iter(loader)


def _repeat(make: Callable[[], tuple[torch.Tensor, torch.Tensor]], count: int) -> Iterator:
    for _ in range(count):
        yield make()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def _process_group(device: torch.device) -> Iterator[None]:
    """A one-rank process group in this process, for DDP (as under ``torchrun --nproc-per-node=1``)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
