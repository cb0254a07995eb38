"""What every benchmark shares: the result row, side-by-side timing, the synthetic data and the machine."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class Row:
    """One line of the results table: ours vs the reference, measured in the same process."""

    what: str
    unit: str
    """What ``ours`` and ``reference`` measure, e.g. ``images/s`` (higher is better) or ``ms`` (lower)."""
    ours: float | None
    reference: float | None
    ratio: float | None
    """ours / reference in ``unit``."""
    identical: bool | None
    """Same results as the reference (None: not applicable or not run)."""
    target: str = ""
    """The ratio we aim for, e.g. ``>= 3x``; ``met`` says whether ``ratio`` reached it."""
    met: bool | None = None
    notes: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_row(
    what: str,
    unit: str,
    ours: float,
    reference: float,
    identical: bool | None,
    target: tuple[str, float] | None = None,
    notes: str = "",
) -> Row:
    """A measured row; ``target`` is (``>=`` or ``<=``, bound) on the ratio ours / reference."""
    ratio = ours / reference
    met = None
    text = ""
    if target is not None:
        op, bound = target
        met = ratio >= bound if op == ">=" else ratio <= bound
        text = f"{op} {bound:g}x"
    return Row(what, unit, ours, reference, ratio, identical, text, met, notes)


def not_run(what: str, unit: str, reason: str, target: str = "") -> Row:
    return Row(what, unit, None, None, None, None, target, None, f"not run: {reason}")


def side_by_side(
    ours: Callable[[], Any], reference: Callable[[], Any], repeats: int, warmup: int = 1
) -> tuple[float, float]:
    """Median seconds of (ours, reference), interleaved so that load changes hit both alike."""
    for _ in range(warmup):
        ours()
        reference()
    ours_times, reference_times = [], []
    for _ in range(repeats):
        for fn, times in ((ours, ours_times), (reference, reference_times)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(ours_times), statistics.median(reference_times)


@contextlib.contextmanager
def single_core() -> Iterator[None]:
    """One thread in torch and none in OpenCV: per-core figures, like inside a DataLoader worker."""
    import cv2
    import torch

    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(0)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv_threads)


def synthetic_dataset(work_dir: Path, *, train: int, val: int, height: int, width: int) -> Path:
    """The project's synthetic Cityscapes (with trainId labels) under ``work_dir``, generated once."""
    from components.data.synth import generate_synthetic_cityscapes
    from components.data.trainids import create_trainid_labels

    root = Path(work_dir) / f"synthetic_{width}x{height}_train{train}_val{val}"
    done = root / ".complete"
    if not done.is_file():
        logger.info("generating %d+%d synthetic %dx%d frames in %s", train, val, width, height, root)
        generate_synthetic_cityscapes(root, train=train, val=val, height=height, width=width)
        create_trainid_labels(root, progress=False)
        done.touch()
    return root


def machine() -> dict[str, Any]:
    """CPU model, cores, GPU (if any) and load: the context every number needs."""
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "gpu": gpu,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def source_commit() -> str:
    """The commit being measured (``components.tracking.git_commit``; $GIT_COMMIT where MLflow is absent)."""
    try:
        from components.tracking import git_commit
    except ImportError:  # a bare GPU machine: only what the bench itself needs is installed there
        return os.environ.get("GIT_COMMIT", "unknown")
    return git_commit()
