"""The GPU check: everything issue 20 asks of one GPU, in one prepared run of at most 8 minutes.

    python -m bench.gpu_check                     # on a CUDA machine (make gpu-check)
    python -m bench.gpu_check --smoke             # tiny sizes on CPU (automatic without CUDA)
    python -m bench.gpu_check --record-not-run "no GPU available (session of 2026-12-05)"

Sections, each with its own time estimate (for one H100; printed first, and a section that would end
past ``--budget`` is skipped with "skipped: budget"):

* ``training``: the trainer's own ``build_stepper`` + ``train_step`` for the paper job (DeepLabv3-R50,
  768x1024, global batch 24 in the trainer's micro-batches), bf16 autocast, channels_last, fused Adam:
  as shipped (deterministic), with cuDNN autotuning, and with ``torch.compile``. End to end (the real
  ``train_loader``, pinned memory, non-blocking copies) and step only (one batch kept on the GPU);
  images/s and MFU against the gate (100 images/s) and the goal (125).
* ``loader``: the real training loader alone (decode-once cache, paper augmentation) on the machine's
  cores, at the recipe's ``data.num_workers`` and at one worker per core.
* ``host_sync``: ``torch.cuda.set_sync_debug_mode("error")`` around training steps between log points,
  and the number of synchronising calls in a whole ``train_one_epoch`` ("warn").
* ``resume``: 2 epochs uninterrupted vs 1 epoch, checkpoint (the real checkpoint code), a fresh model
  resumed from it, 1 epoch; max weight difference, deterministic algorithms on and off, next to the
  difference between two uninterrupted runs.
* ``ddp``: real ``torchrun`` ranks, DDP + ``torch.nn.SyncBatchNorm`` (world size 1 on NCCL; 2 ranks on
  gloo sharing the GPU, which exercises SyncBatchNorm's cross-rank path) vs one process without DDP.
  Tolerance: the difference that permuting the batch makes in one process (same maths, another
  summation order), measured in the same run.
* ``inference``: PyTorch on CUDA at 1024x2048, batch 1 and 8: fp32, bf16, channels_last, compiled;
  argmax agreement vs fp32 (random weights: nothing to download; their logits nearly tie, so agreement
  is a lower bound).

Writes ``--json`` (default ``bench/gpu_results.json``) and the GPU section of ``bench/RESULTS.md``
(smoke runs write only their JSON, to ``runs/gpu_check_smoke.json`` unless told otherwise). The GPU
machine has torch but not all of the project's packages: this module imports only what the sections
need (``make gpu-wheels`` downloads the rest).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from bench.common import Row, machine, not_run, source_commit, synthetic_dataset

logger = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).parent
REPO = BENCH_DIR.parent
TFLOP_PER_IMAGE = 3.1
"""DeepLabv3-R50 forward + backward of one 768x1024 image (the paper job)."""
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0}
"""Dense bf16 peak (the first name the device's contains): the SXM parts 989 TFLOP/s (the H200 has the
H100's compute); MFU is reported against it."""
GATE, GOAL = 100.0, 125.0
"""Training images/s end to end on one H100-class GPU: the gate and the goal (~50% MFU)."""
INFERENCE_GOAL = 30.0
"""Inference images/s at 1024x2048 on one H100-class GPU..."""
MIN_AGREEMENT = 0.995
"""...with this argmax agreement vs fp32."""
BUDGET_S = 480.0


@dataclass(frozen=True)
class Sizes:
    backbone: str
    size: tuple[int, int]
    """Training frames, and the paper recipe's resize (height, width)."""
    batch: int
    """Global batch of the throughput runs."""
    frames: int
    """Synthetic training frames generated."""
    copies: int
    """Hard-linked copies of them for the long runs (an epoch as long as the measurement)."""
    warmup: int
    steps: int
    small_size: tuple[int, int]
    """Resume and DDP runs."""
    small_batch: int
    inference_size: tuple[int, int]
    inference_batches: tuple[int, ...]
    repeats: int
    compile_backend: str
    workers: int | None
    """``data.num_workers`` (None: the recipe's)."""
    ddp_runs: tuple[tuple[str, int], ...]
    """(backend, world size) of the torchrun runs."""
    deterministic: tuple[bool, ...]
    """``train.deterministic`` settings measured (cuDNN autotuning exists on CUDA only)."""
    estimates: dict[str, float]
    """Seconds each section takes (full: one H100, smoke: 2 CPU cores). The full ones are estimates from
    the 2026-11-26 H200 timings (steps ~0.3 s, an inductor build ~1 min), not yet measured: the JSON
    records each section's seconds, to correct them after the first run."""


FULL = Sizes(
    backbone="resnet50",
    size=(768, 1024),
    batch=24,
    frames=48,
    copies=7,
    warmup=3,
    steps=10,
    small_size=(384, 512),
    small_batch=8,
    inference_size=(1024, 2048),
    inference_batches=(1, 8),
    repeats=10,
    compile_backend="inductor",
    workers=None,
    # NCCL allows one rank per GPU; gloo runs 2 on one GPU, through SyncBatchNorm's cross-rank path.
    ddp_runs=(("nccl", 1), ("gloo", 2)),
    deterministic=(True, False),
    estimates={
        "data": 25,
        "training": 30,
        "loader": 20,
        "host_sync": 15,
        "resume": 40,
        "ddp": 60,
        "inference": 25,
        "training_compiled": 120,
        "inference_compiled": 100,
    },
)
SMOKE = Sizes(
    backbone="mobilenet_v3_large",
    size=(64, 128),
    batch=4,
    frames=8,
    copies=2,
    warmup=1,
    steps=2,
    small_size=(64, 128),
    small_batch=4,
    inference_size=(64, 128),
    inference_batches=(1, 2),
    repeats=1,
    compile_backend="eager",  # dynamo's tracing without inductor's C++ build: the code path, in seconds
    workers=0,  # starting worker processes costs more than these steps
    ddp_runs=(("gloo", 2),),
    deterministic=(True,),
    estimates={
        "data": 3,
        "training": 5,
        "loader": 5,
        "host_sync": 1,
        "resume": 8,
        "ddp": 25,
        "inference": 3,
        "training_compiled": 15,
        "inference_compiled": 10,
    },
)


class Skipped(Exception):
    """A section that cannot run here (no CUDA); its reason becomes the section's status."""


@dataclass
class Check:
    sizes: Sizes
    device: torch.device
    work: Path
    budget_s: float
    started: float
    sections: dict[str, dict[str, Any]]
    rows: list[Row]
    root: Path | None = None
    """The generated frames (resume, DDP)."""
    long_root: Path | None = None
    """The same, with hard-linked copies (throughput, loader)."""

    def run(self, name: str, section: Callable[[Check], dict[str, Any]]) -> None:
        estimate = self.sizes.estimates[name]
        left = self.budget_s - (time.perf_counter() - self.started)
        record: dict[str, Any] = {"estimate_s": estimate}
        if estimate > left:
            record["status"] = f"skipped: budget ({estimate:.0f} s estimated, {max(left, 0):.0f} s left)"
        else:
            print(f"== {name}: estimated {estimate:.0f} s", flush=True)
            start = time.perf_counter()
            try:
                record.update(section(self), status="ok")
            except Skipped as why:
                record["status"] = f"skipped: {why}"
            except Exception as exc:  # keep the other sections: GPU time is scarce
                traceback.print_exc()
                record["status"] = f"failed: {type(exc).__name__}: {exc}"
            record["seconds"] = round(time.perf_counter() - start, 1)
        print(f"== {name}: {record['status']} ({record.get('seconds', 0):.0f} s)", flush=True)
        self.sections[name] = record


# --- shared set-up ------------------------------------------------------------------------------


def paper_config(root: Path, sizes: Sizes, *overrides: str) -> Any:
    """The paper recipe as shipped on ``root``: random weights (the speed does not depend on them)."""
    from components.config import load_config

    height, width = sizes.size
    return load_config(
        "paper",
        [
            f"data.root={root}",
            "model.weights=none",
            f"model.backbone={sizes.backbone}",
            f"augment.resize=[{height}, {width}]",
            f"train.global_batch_size={sizes.batch}",
            f"train.output_dir={root.parent / 'train'}",
            *([] if sizes.workers is None else [f"data.num_workers={sizes.workers}"]),
            *overrides,
        ],
    )


@contextlib.contextmanager
def determinism(cfg: Any, device: torch.device) -> Iterator[None]:
    """``components.trainer.configure_determinism`` for the block, then the process's settings back."""
    from components.trainer import configure_determinism

    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    torch.use_deterministic_algorithms(False)
    configure_determinism(cfg.train, device)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark = saved[2]


def stepper_and_loader(cfg: Any, device: torch.device, compile_backend: str | None = None) -> tuple[Any, Any]:
    """One process's ``Stepper`` and training loader, built as ``components.train`` builds them."""
    from components.data.dataset import CityscapesSegmentation
    from components.data.sampling import train_loader
    from components.data.transforms import train_transform
    from components.distributed import DistContext
    from components.trainer import build_stepper, plan_batches

    plan = plan_batches(cfg.train, 1)
    cache = cfg.augment.resize if cfg.data.cache else None
    dataset = CityscapesSegmentation(cfg.data.root, "train", train_transform(cfg.augment), cache_size=cache)
    loader = train_loader(cfg, dataset, plan.per_rank, pin_memory=device.type == "cuda")
    stepper = build_stepper(cfg, DistContext(0, 0, 1, device, None), plan, len(loader), threading.Event())
    if compile_backend is not None:  # as build_stepper does for train.compile, with a chosen backend
        stepper.model = torch.compile(stepper.model, backend=compile_backend)
    return stepper, loader


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().double().cpu() for name, value in model.state_dict().items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


# --- sections -----------------------------------------------------------------------------------


def section_data(check: Check) -> dict[str, Any]:
    sizes = check.sizes
    height, width = sizes.size
    check.root = synthetic_dataset(check.work, train=sizes.frames, val=1, height=height, width=width)
    check.long_root = replicated(check.root, check.work / f"{check.root.name}_x{sizes.copies}", sizes.copies)
    return {"frames": sizes.frames, "copies": sizes.copies, "size": [height, width]}


def replicated(root: Path, out: Path, copies: int) -> Path:
    """``copies`` hard links of every training pair of ``root`` under new city names (and its val split):
    epochs as long as a measurement needs without generating more frames. Each copy is still decoded,
    cached and augmented on its own."""
    from components.data.layout import split_pairs

    if (out / ".complete").is_file():
        return out
    for copy_index in range(copies):
        for image, label in split_pairs(root, "train"):
            for path, top in ((image, "leftImg8bit"), (label, "gtFine")):
                city = path.parent.name
                target = out / top / "train" / f"{city}-{copy_index}" / path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.exists():
                    os.link(path, target)
    for image, label in split_pairs(root, "val"):
        for path, top in ((image, "leftImg8bit"), (label, "gtFine")):
            target = out / top / "val" / path.parent.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                os.link(path, target)
    (out / ".complete").touch()
    return out


def training(check: Check, variants: tuple[tuple[str, bool, bool], ...]) -> dict[str, Any]:
    """(name, deterministic, compiled) variants: end to end and step only, images/s and MFU."""
    sizes, device = check.sizes, check.device
    results = {}
    for name, deterministic, compiled in variants:
        micro = None
        while True:
            overrides = [f"train.deterministic={str(deterministic).lower()}"]
            if micro is not None:
                overrides.append(f"train.micro_batch_size={micro}")
            cfg = paper_config(check.long_root, sizes, *overrides)
            try:
                with determinism(cfg, device):
                    results[name] = throughput(cfg, sizes, device, compiled)
                break
            except torch.OutOfMemoryError:
                micro = (micro or sizes.batch) // 2
                if micro == 0:
                    raise
                logger.warning("%s: out of memory, micro-batch %d", name, micro)
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        result = results[name]
        print(
            f"   {name}: end to end {result['end_to_end_images_per_s']:.1f} images/s, step only "
            f"{result['step_only_images_per_s']:.1f} images/s, micro-batch {result['micro_batch']}",
            flush=True,
        )
        check.rows.append(training_row(name, result, sizes, device))
    return results


def throughput(cfg: Any, sizes: Sizes, device: torch.device, compiled: bool) -> dict[str, Any]:
    stepper, loader = stepper_and_loader(cfg, device, sizes.compile_backend if compiled else None)
    step = stepper.step
    loader.sampler.set_epoch(0)
    batches = iter(loader)
    needed = sizes.warmup + sizes.steps
    if len(loader) < needed:
        raise RuntimeError(f"{len(loader)} batches per epoch, {needed} needed: more copies")
    start = time.perf_counter()
    for _ in range(sizes.warmup):
        step(*next(batches))
    synchronize(device)
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(sizes.steps):
        batch = next(batches)
        loss = step(*batch)
    synchronize(device)
    end_to_end = sizes.steps * cfg.train.global_batch_size / (time.perf_counter() - start)
    batch = tuple(tensor.to(device) for tensor in batch)  # step only: one batch kept on the device
    start = time.perf_counter()
    for _ in range(sizes.steps):
        loss = step(*batch)
    synchronize(device)
    step_only = sizes.steps * cfg.train.global_batch_size / (time.perf_counter() - start)
    peak = peak_tflops(device)
    return {
        "end_to_end_images_per_s": end_to_end,
        "step_only_images_per_s": step_only,
        "mfu_end_to_end": end_to_end * TFLOP_PER_IMAGE / peak if peak else None,
        "warmup_s": round(warmup_s, 1),
        "micro_batch": stepper.plan.micro,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "last_loss": float(loss),
        "loader_workers": cfg.data.num_workers,
    }


def training_row(name: str, result: dict[str, Any], sizes: Sizes, device: torch.device) -> Row:
    e2e = result["end_to_end_images_per_s"]
    peak = peak_tflops(device)
    mfu = (
        f"MFU {result['mfu_end_to_end']:.1%} of {peak:g} TFLOP/s bf16 dense at {TFLOP_PER_IMAGE} TFLOP/image"
        if peak
        else "MFU: no peak known for this device"
    )
    memory = f"peak {result['peak_memory_gib']:.1f} GiB; " if result["peak_memory_gib"] is not None else ""
    return Row(
        what=f"GPU training {name}, DeepLabv3-{sizes.backbone} {_size(sizes.size)} batch {sizes.batch}",
        unit="images/s",
        ours=e2e,
        reference=None,
        ratio=None,
        identical=None,
        target=f">= {GATE:g} images/s (goal {GOAL:g})",
        met=e2e >= GATE,
        notes=(
            f"{_device_name(device)}; end to end (loader, {result['loader_workers']} workers); step only "
            f"{result['step_only_images_per_s']:.1f} images/s; {mfu}; {memory}micro-batch "
            f"{result['micro_batch']}; first {sizes.warmup} steps {result['warmup_s']} s"
        ),
    )


def section_training(check: Check) -> dict[str, Any]:
    names = {True: "eager, as shipped (deterministic)", False: "eager, autotune"}
    return training(check, tuple((names[on], on, False) for on in check.sizes.deterministic))


def section_training_compiled(check: Check) -> dict[str, Any]:
    return training(check, (("torch.compile, autotune", False, True),))


def section_loader(check: Check) -> dict[str, Any]:
    """The training loader alone: images/s it delivers (pinned, as the trainer gets them)."""
    from components.data.dataset import CityscapesSegmentation
    from components.data.sampling import train_loader
    from components.data.transforms import train_transform

    sizes, device = check.sizes, check.device
    cores = len(os.sched_getaffinity(0))
    results = {}
    for workers in sorted({paper_config(check.long_root, sizes).data.num_workers, cores - 1}):
        cfg = paper_config(check.long_root, sizes, f"data.num_workers={workers}")
        dataset = CityscapesSegmentation(
            cfg.data.root, "train", train_transform(cfg.augment), cache_size=cfg.augment.resize
        )
        loader = train_loader(cfg, dataset, sizes.batch, pin_memory=device.type == "cuda")
        loader.sampler.set_epoch(0)
        batches = iter(loader)
        for _ in range(sizes.warmup):  # workers start, the prefetch queue fills
            next(batches)
        count = min(len(loader) - sizes.warmup, 2 * sizes.steps)
        start = time.perf_counter()
        for _ in range(count):
            next(batches)
        rate = count * sizes.batch / (time.perf_counter() - start)
        del batches, loader
        results[f"{workers} workers"] = rate
        print(f"   {workers} workers: {rate:.1f} images/s", flush=True)
    step_rates = [
        section["step_only_images_per_s"]
        for key in ("training", "training_compiled")
        for section in check.sections.get(key, {}).values()
        if isinstance(section, dict) and "step_only_images_per_s" in section
    ]
    fastest_step = max(step_rates, default=None)
    best = max(results.values())
    check.rows.append(
        Row(
            what=f"GPU machine data loader alone, paper recipe {_size(sizes.size)} batch {sizes.batch}",
            unit="images/s",
            ours=best,
            reference=fastest_step,
            ratio=best / fastest_step if fastest_step else None,
            identical=None,
            target=">= 1x the step rate",
            met=best >= fastest_step if fastest_step else None,
            notes=f"{cores} cores; "
            + ", ".join(f"{name}: {rate:.1f}" for name, rate in results.items())
            + "; reference = the fastest step-only training rate",
        )
    )
    return {"images_per_s": results, "cores": cores, "fastest_step_only_images_per_s": fastest_step}


def section_host_sync(check: Check) -> dict[str, Any]:
    """No synchronising CUDA call in the steps between log points ("error" mode raises at the first)."""
    from components.trainer import train_one_epoch

    device, sizes = check.device, check.sizes
    if device.type != "cuda":
        raise Skipped("no CUDA (tests/test_train_sync.py counts host reads on CPU)")
    cfg = paper_config(check.long_root, sizes, "train.deterministic=false", "train.epochs=1")
    with determinism(cfg, device):
        stepper, loader = stepper_and_loader(cfg, device)
        step = stepper.step
        loader.sampler.set_epoch(0)
        batches = iter(loader)
        step(*next(batches))  # cuDNN autotuning and allocator warm-up happen once, before
        pinned = [next(batches) for _ in range(sizes.steps)]  # loaded before: the loader is not the check
        del batches, loader  # its workers and pinning thread stop: only the steps run in "error" mode
        synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            total = torch.zeros((), dtype=torch.float64, device=device)
            for images, labels in pinned:
                total += step(images, labels)
            error_mode = "passed"
        except RuntimeError as error:  # the first synchronising call, named
            error_mode = f"raised: {str(error).splitlines()[0]}"
        finally:
            torch.cuda.set_sync_debug_mode(0)
        # A whole epoch with one log point (its last step): its loss and the epoch's mean are read.
        cfg = paper_config(check.root, sizes, "train.deterministic=false", "train.log_every=1000")
        stepper, loader = stepper_and_loader(cfg, device)
        loader.sampler.set_epoch(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train_one_epoch(stepper, loader, 0)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    print(f"   {sizes.steps} steps in 'error' mode: {error_mode}; an epoch: {len(syncs)} syncs", flush=True)
    check.rows.append(
        Row(
            what="GPU host syncs in train_one_epoch (set_sync_debug_mode)",
            unit="syncs",
            ours=float(len(syncs)),
            reference=2.0,
            ratio=None,
            identical=None,
            target="none between log points",
            met=error_mode == "passed" and len(syncs) <= 2,
            notes=f"{_device_name(device)}; {sizes.steps} steps in 'error' mode: {error_mode}; an epoch of "
            f"{len(loader)} steps with one log point: {len(syncs)} syncs (expected 2: the logged loss and "
            "the epoch's mean)",
        )
    )
    return {
        "error_mode": error_mode,
        "epoch_steps": len(loader),
        "epoch_syncs": len(syncs),
        "epoch_sync_messages": syncs[:5],
    }


def section_resume(check: Check) -> dict[str, Any]:
    """2 epochs vs 1 + checkpoint + a fresh model resumed from it + 1, deterministic on and off."""
    from components.checkpoint import load_latest_checkpoint, save_checkpoint
    from components.trainer import train_one_epoch

    sizes, device = check.sizes, check.device
    height, width = sizes.small_size
    results = {}

    def train(cfg: Any, epochs: range, resume: bool, save: bool) -> dict[str, torch.Tensor]:
        stepper, loader = stepper_and_loader(cfg, device)
        if resume:
            stepper.state.from_checkpoint(load_latest_checkpoint(cfg.train.output_dir))
            assert stepper.state.epoch == epochs.start
        for epoch in epochs:
            loader.sampler.set_epoch(epoch)
            if train_one_epoch(stepper, loader, epoch) is None:
                raise RuntimeError("stopped")
            stepper.state.epoch = epoch + 1
            if save:
                save_checkpoint(stepper.state.to_checkpoint(cfg), cfg.train.output_dir)
        return weights(stepper.state.model)

    for deterministic in sizes.deterministic:
        key = f"deterministic {'on' if deterministic else 'off'}"
        with tempfile.TemporaryDirectory(dir=check.work) as out:
            cfg = paper_config(
                check.root,
                replace(sizes, batch=sizes.small_batch),
                f"augment.resize=[{height}, {width}]",
                "train.epochs=2",
                f"train.deterministic={str(deterministic).lower()}",
                f"train.output_dir={out}",
            )
            with determinism(cfg, device):
                uninterrupted = train(cfg, range(2), resume=False, save=False)
                again = train(cfg, range(2), resume=False, save=False)
                train(cfg, range(1), resume=False, save=True)  # stopped after epoch 1
                resumed = train(cfg, range(1, 2), resume=True, save=False)
        results[key] = {
            "resumed_vs_uninterrupted": max_diff(resumed, uninterrupted),
            "uninterrupted_run_to_run": max_diff(again, uninterrupted),
        }
        diff = results[key]
        print(f"   {key}: {diff}", flush=True)
        check.rows.append(
            Row(
                what=f"GPU resume after epoch 1 of 2, {key} (max abs weight diff vs uninterrupted)",
                unit="max abs diff",
                ours=diff["resumed_vs_uninterrupted"],
                reference=diff["uninterrupted_run_to_run"],
                ratio=None,
                identical=diff["resumed_vs_uninterrupted"] == 0,
                target="0, or <= 10x the run-to-run difference",
                met=resume_ok(diff["resumed_vs_uninterrupted"], diff["uninterrupted_run_to_run"]),
                notes=f"{_device_name(device)}; DeepLabv3-{sizes.backbone} {height}x{width} batch "
                f"{sizes.small_batch}, {sizes.frames // sizes.small_batch} steps/epoch, paper recipe; "
                "reference = two uninterrupted runs' difference",
            )
        )
    return results


def resume_ok(resumed: float, run_to_run: float) -> bool:
    """Bit-exact where two uninterrupted runs are; else no further off than 10x what they differ by
    (differences grow chaotically from the first kernel that rounds differently, resumed or not)."""
    return resumed == 0 or resumed <= 10 * run_to_run


def section_ddp(check: Check) -> dict[str, Any]:
    """torchrun ranks with DDP + SyncBatchNorm vs one process, after the same optimizer steps."""
    sizes, device = check.sizes, check.device
    cfg = ddp_config(check, sizes)
    images, labels = ddp_batch(sizes)
    with determinism(cfg, device):
        reference = ddp_reference(cfg, device, images, labels)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(1))
        permuted = ddp_reference(cfg, device, images[order], labels[order])
    tolerance = 10 * max_diff(permuted, reference)
    results: dict[str, Any] = {"batch_permutation_diff": tolerance / 10}
    for backend, world in sizes.ddp_runs:
        with tempfile.TemporaryDirectory(dir=check.work) as out:
            path = Path(out) / "rank0.pt"
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={world}",
                "-m",
                "bench.gpu_check",
                "--ddp-worker",
                str(path),
                "--backend",
                backend,
                "--work-dir",
                str(check.work),
            ] + (["--smoke"] if sizes is SMOKE else [])
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            }
            subprocess.run(command, check=True, cwd=REPO, env=env, timeout=300)
            ranks = torch.load(path, weights_only=True)
        diff = max_diff(ranks, reference)
        key = f"{backend} world {world}"
        results[key] = diff
        print(f"   {key}: max abs diff {diff:.3g} (tolerance {tolerance:.3g})", flush=True)
        batchnorm = "torch.nn.SyncBatchNorm" if device.type == "cuda" else "CpuSyncBatchNorm2d"
        check.rows.append(
            Row(
                what=f"GPU DDP via torchrun, {backend}, world size {world}, {batchnorm} (vs one process)",
                unit="max abs diff",
                ours=diff,
                reference=tolerance,
                ratio=None,
                identical=diff == 0,
                target="<= tolerance",
                met=diff <= tolerance,
                notes=f"{_device_name(device)}; {DDP_STEPS} Adam steps, DeepLabv3-{sizes.backbone} "
                f"{sizes.small_size[0]}x{sizes.small_size[1]}, global batch {sizes.small_batch}, fp32, "
                "deterministic; tolerance = 10x the difference permuting the batch makes in one process",
            )
        )
    return results


DDP_STEPS = 2


def ddp_config(check: Check, sizes: Sizes) -> Any:
    # fp32 (no autocast, no TF32) and no dropout: the comparison is about the maths of the split.
    height, width = sizes.small_size
    return paper_config(
        check.work,
        replace(sizes, batch=sizes.small_batch),
        f"augment.resize=[{height}, {width}]",
        "train.amp=none",
        "train.head_dropout=0.0",
        "train.deterministic=true",
    )


def ddp_batch(sizes: Sizes) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch (the same in every process): images and labels with some ignored pixels."""
    generator = torch.Generator().manual_seed(0)
    height, width = sizes.small_size
    images = torch.randn(sizes.small_batch, 3, height, width, generator=generator)
    labels = torch.randint(0, 19, (sizes.small_batch, height, width), generator=generator)
    labels[:, : height // 8] = 255
    return images, labels


def ddp_steps(
    model: torch.nn.Module,
    cfg: Any,
    device: torch.device,
    images: torch.Tensor,
    labels: torch.Tensor,
    ddp: Any = None,
) -> None:
    from components.optim import build_optimizer
    from components.trainer import autocast_dtype, train_step, uses_channels_last

    raw = ddp.module if ddp is not None else model
    optimizer = build_optimizer(raw, cfg.optimizer)
    memory_format = torch.channels_last if uses_channels_last(cfg, device) else torch.contiguous_format
    images = images.to(device).contiguous(memory_format=memory_format)
    labels = labels.to(device)
    for _ in range(DDP_STEPS):
        train_step(
            model,
            optimizer,
            None,
            images,
            labels,
            micro_batch=len(images),
            autocast_dtype=autocast_dtype(cfg, device),
            ddp=ddp,
        )


def ddp_reference(
    cfg: Any, device: torch.device, images: torch.Tensor, labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    from components.trainer import build_trainable_model

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        model = build_trainable_model(cfg, device, world_size=1)
        model.train()
        ddp_steps(model, cfg, device, images, labels)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return weights(model)


def ddp_worker(args: argparse.Namespace) -> int:
    """One torchrun rank: its share of the batch through DDP + synchronised BatchNorm."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from components import distributed
    from components.trainer import build_trainable_model

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend, device_id=device if args.backend == "nccl" else None)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    sizes = SMOKE if args.smoke else FULL
    check = Check(sizes, device, args.work_dir, BUDGET_S, 0.0, {}, [])
    cfg = ddp_config(check, sizes)
    try:
        with determinism(cfg, device):
            model = build_trainable_model(cfg, device, world)
            if world == 1:  # build_trainable_model converts for world size > 1 only
                model = distributed.convert_sync_batchnorm(model, device)
            model.train()
            ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
            images, labels = ddp_batch(sizes)
            share = len(images) // world
            mine = slice(rank * share, (rank + 1) * share)
            ddp_steps(ddp, cfg, device, images[mine], labels[mine], ddp=ddp)
        if rank == 0:
            torch.save(weights(model), args.ddp_worker)
    finally:
        dist.destroy_process_group()
    return 0


def section_inference(check: Check, compiled: bool = False) -> dict[str, Any]:
    """PyTorch on the device at 1024x2048: images/s per variant and argmax agreement with fp32."""
    from components.config import ModelConfig
    from components.model import build_model

    sizes, device = check.sizes, check.device
    torch.manual_seed(0)
    # As served: no auxiliary head (a training-only loss). "fp32" is torch's default: TF32 convolutions.
    spec = ModelConfig(backbone=sizes.backbone, weights="none", aux_loss=False)
    fp32 = build_model(spec).eval().to(device)
    channels_last = copy.deepcopy(fp32).to(memory_format=torch.channels_last)
    bf16 = torch.bfloat16
    if compiled:
        variants = {
            "bf16 channels_last torch.compile": (
                torch.compile(channels_last, backend=sizes.compile_backend, dynamic=False),
                bf16,
                True,
            )
        }
    else:
        variants = {
            "fp32": (fp32, None, False),
            "fp32 channels_last": (channels_last, None, True),
            "bf16": (fp32, bf16, False),
            "bf16 channels_last": (channels_last, bf16, True),
        }
    results: dict[str, Any] = {}
    height, width = sizes.inference_size
    for batch in sizes.inference_batches:
        images = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(0)).to(device)
        reference = predict(fp32, images, None, False)
        for name, (net, dtype, nhwc) in variants.items():
            seconds, masks = timed(
                lambda net=net, dtype=dtype, nhwc=nhwc, images=images: predict(net, images, dtype, nhwc),
                sizes.repeats,
                device,
            )
            agreement = float((masks == reference).double().mean())
            rate = batch / seconds
            results[f"{name} batch {batch}"] = {"images_per_s": rate, "argmax_agreement": agreement}
            print(f"   {name} batch {batch}: {rate:.1f} images/s, agreement {agreement:.5f}", flush=True)
            check.rows.append(
                Row(
                    what=f"GPU inference torch (engine torch), DeepLabv3-{sizes.backbone} {height}x{width} "
                    f"batch {batch}: {name}",
                    unit="images/s",
                    ours=rate,
                    reference=None,
                    ratio=None,
                    identical=agreement >= MIN_AGREEMENT,
                    target=f">= {INFERENCE_GOAL:g} images/s, agreement >= {MIN_AGREEMENT}",
                    met=rate >= INFERENCE_GOAL and agreement >= MIN_AGREEMENT,
                    notes=f"{_device_name(device)}; argmax agreement vs fp32 {agreement:.5f} (random "
                    f"weights: logits nearly tie); input and argmax on the device; median of {sizes.repeats}",
                )
            )
    return results


def section_inference_compiled(check: Check) -> dict[str, Any]:
    return section_inference(check, compiled=True)


@torch.inference_mode()
def predict(
    net: torch.nn.Module, images: torch.Tensor, dtype: torch.dtype | None, nhwc: bool
) -> torch.Tensor:
    if nhwc:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        return net(images)["out"].argmax(1)


def timed(call: Callable[[], torch.Tensor], repeats: int, device: torch.device) -> tuple[float, torch.Tensor]:
    """(median seconds, last result) after one warm-up call (which compiles, where compiled)."""
    result = call()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = call()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU smoke"


SECTIONS: tuple[tuple[str, Callable[[Check], dict[str, Any]]], ...] = (
    ("data", section_data),
    ("training", section_training),
    ("loader", section_loader),
    ("host_sync", section_host_sync),
    ("resume", section_resume),
    ("ddp", section_ddp),
    ("inference", section_inference),
    ("training_compiled", section_training_compiled),
    ("inference_compiled", section_inference_compiled),
)


def not_run_rows(reason: str) -> list[Row]:
    """What the check measures, with its targets, when it could not run."""
    return [
        not_run(
            f"GPU training, DeepLabv3-resnet50 {_size(FULL.size)} batch {FULL.batch}, end to end",
            "images/s",
            reason,
            f">= {GATE:g} images/s (goal {GOAL:g})",
        ),
        not_run(
            f"GPU inference torch (engine torch), DeepLabv3-resnet50 {_size(FULL.inference_size)} batch 1, 8",
            "images/s",
            reason,
            f">= {INFERENCE_GOAL:g} images/s, agreement >= {MIN_AGREEMENT}",
        ),
        not_run(
            "GPU resume after epoch 1 of 2, deterministic on and off (max abs weight diff vs uninterrupted)",
            "max abs diff",
            reason,
            "0, or <= 10x the run-to-run difference",
        ),
        not_run(
            "GPU DDP via torchrun + torch.nn.SyncBatchNorm (vs one process)",
            "max abs diff",
            reason,
            "<= tolerance",
        ),
        not_run(
            "GPU host syncs in train_one_epoch (set_sync_debug_mode)",
            "syncs",
            reason,
            "none between log points",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (automatic without CUDA)")
    parser.add_argument(
        "--json", type=Path, help="default: bench/gpu_results.json (smoke: runs/gpu_check_smoke.json)"
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=BENCH_DIR / "RESULTS.md",
        help="GPU section updated (not in smoke runs)",
    )
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "gpu_check")
    parser.add_argument(
        "--budget", type=float, default=BUDGET_S, help="seconds; sections that would end later are skipped"
    )
    parser.add_argument(
        "--only", nargs="+", choices=[name for name, _ in SECTIONS], help="these sections (and data)"
    )
    parser.add_argument(
        "--record-not-run", metavar="REASON", help="write 'not run: REASON' rows, measure nothing"
    )
    parser.add_argument("--ddp-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.ddp_worker is not None:
        return ddp_worker(args)

    from bench.run import replace_gpu_section

    cuda = torch.cuda.is_available()
    smoke = (args.smoke or not cuda) and not args.record_not_run
    json_path = args.json or (
        REPO / "runs" / "gpu_check_smoke.json" if smoke else BENCH_DIR / "gpu_results.json"
    )
    run: dict[str, Any] = {
        "command": " ".join(["python -m bench.gpu_check", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": source_commit(),
        "machine": machine(),
    }
    if args.record_not_run:
        run.update(mode="not run", rows=[row.to_dict() for row in not_run_rows(args.record_not_run)])
        _write(json_path, json.dumps(run, indent=2))
        replace_gpu_section(args.results, run)
        print(f"wrote {json_path} and the GPU section of {args.results}")
        return 0

    # cuBLAS reads it when it starts: before any CUDA work (configure_determinism sets it too late here).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    sizes = SMOKE if smoke else FULL
    device = torch.device("cuda" if cuda else "cpu")
    chosen = [(name, fn) for name, fn in SECTIONS if args.only is None or name in {"data", *args.only}]
    estimate = sum(sizes.estimates[name] for name, _ in chosen)
    print(f"GPU check ({'smoke' if smoke else 'full'}) on {_device_name(device)}, torch {torch.__version__}")
    for name, _ in chosen:
        print(f"   estimate {name}: {sizes.estimates[name]:.0f} s")
    print(f"   estimate total: {estimate:.0f} s (budget {args.budget:.0f} s)", flush=True)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    check = Check(sizes, device, args.work_dir, args.budget, time.perf_counter(), {}, [])
    for name, fn in chosen:
        check.run(name, fn)
    run.update(
        mode="smoke" if smoke else "full",
        estimate_s=estimate,
        budget_s=args.budget,
        seconds=round(time.perf_counter() - check.started, 1),
        load_average_end=[round(x, 2) for x in os.getloadavg()],
        sections=check.sections,
        rows=[row.to_dict() for row in check.rows],
    )
    _write(json_path, json.dumps(run, indent=2, default=str))
    if not smoke:
        replace_gpu_section(args.results, run)
    failed = [name for name, record in check.sections.items() if record["status"].startswith("failed")]
    print(f"{run['seconds']:.0f} s; wrote {json_path}" + ("" if smoke else f" and {args.results}"))
    if failed:
        print(f"failed sections: {', '.join(failed)}")
    return 1 if failed else 0


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
