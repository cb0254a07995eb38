"""trainId label generation: ours (parallel processes) vs cityscapesscripts' ``csCreateTrainIdLabelImgs``.

Both convert the same polygon annotations in two private copies of ``gtFine/`` (the reference in-process,
its progress output silenced); every output PNG must be byte-identical. The annotations are repeated
``copies`` times so the work outweighs the worker start-up, as it does for the 5,000 real ones.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from pathlib import Path

from bench.common import Row, make_row, side_by_side
from components.data.trainids import POLYGON_SUFFIX, TRAINID_SUFFIX, create_trainid_labels

TARGET = (">=", 1.8)


def bench_trainids(root: Path, work_dir: Path, *, copies: int = 6, repeats: int = 3) -> Row:
    """annotations/s, ours (all cores) vs the sequential reference, on ``copies`` x the annotations."""
    ours_root, reference_root = (
        _annotation_copy(root, Path(work_dir) / name, copies) for name in ("ours", "ref")
    )
    count = len(_annotations(ours_root))
    cores = len(os.sched_getaffinity(0))

    def ours() -> None:
        _clear_outputs(ours_root)
        create_trainid_labels(ours_root, progress=False)

    def reference() -> None:
        _clear_outputs(reference_root)
        _run_cityscapesscripts(reference_root)

    ours_s, reference_s = side_by_side(ours, reference, repeats)
    identical = all(
        path.read_bytes() == (reference_root / path.relative_to(ours_root)).read_bytes()
        for path in sorted(ours_root.glob(f"gtFine/*/*/*{TRAINID_SUFFIX}"))
    ) and count == len(list(reference_root.glob(f"gtFine/*/*/*{TRAINID_SUFFIX}")))
    return make_row(
        f"trainId labels ({cores} processes vs sequential)",
        "annotations/s",
        count / ours_s,
        count / reference_s,
        identical,
        TARGET,
        f"{count} annotations, byte-identical PNGs checked, median of {repeats}",
    )


def _run_cityscapesscripts(root: Path) -> None:
    """``csCreateTrainIdLabelImgs`` on ``root`` (it reads $CITYSCAPES_DATASET), output silenced."""
    from cityscapesscripts.preparation import createTrainIdLabelImgs

    previous = os.environ.get("CITYSCAPES_DATASET")
    os.environ["CITYSCAPES_DATASET"] = str(root)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            createTrainIdLabelImgs.main()
    finally:
        if previous is None:
            del os.environ["CITYSCAPES_DATASET"]
        else:
            os.environ["CITYSCAPES_DATASET"] = previous


def _annotations(root: Path) -> list[Path]:
    return sorted(root.glob(f"gtFine/*/*/*{POLYGON_SUFFIX}"))


def _annotation_copy(source: Path, dest: Path, copies: int) -> Path:
    """``dest/gtFine`` with each annotation of ``source`` ``copies`` times (as other frame numbers)."""
    shutil.rmtree(dest, ignore_errors=True)
    for polygons in _annotations(source):
        city_dir = dest / polygons.relative_to(source).parent
        city_dir.mkdir(parents=True, exist_ok=True)
        city, seq, frame, rest = polygons.name.split("_", 3)
        for copy in range(copies):
            shutil.copyfile(polygons, city_dir / f"{city}_{seq}_{int(frame) + copy:06d}_{rest}")
    return dest


def _clear_outputs(root: Path) -> None:
    for path in root.glob(f"gtFine/*/*/*{TRAINID_SUFFIX}"):
        path.unlink()
