"""``*_gtFine_labelTrainIds.png`` from the polygon annotations, with cityscapesscripts' own drawing code.

Same files and bytes as cityscapesscripts' sequential ``csCreateTrainIdLabelImgs``, but in parallel
processes, skipping outputs that are complete and newer than their annotation, and never leaving a
half-written PNG behind (each output is written to a temporary name and renamed into place).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from cityscapesscripts.preparation.json2labelImg import json2labelImg
from tqdm import tqdm
from tqdm._monitor import TMonitor

from components.errors import DataError

logger = logging.getLogger(__name__)

POLYGON_SUFFIX = "_polygons.json"
TRAINID_SUFFIX = "_labelTrainIds.png"
# The same search as cityscapesscripts' createTrainIdLabelImgs.py: fine, then coarse annotations.
ANNOTATION_GLOBS = ("gtFine/*/*/*_gt*_polygons.json", "gtCoarse/*/*/*_gt*_polygons.json")
ANNOTATIONS_PER_AUTO_WORKER = 64
_PNG_END = b"IEND\xaeB`\x82"  # type and CRC of the last chunk of every complete PNG


def trainid_path(polygons: Path) -> Path:
    return polygons.with_name(polygons.name.replace(POLYGON_SUFFIX, TRAINID_SUFFIX))


def create_trainid_labels(root: Path, workers: int | None = None, progress: bool = True) -> int:
    """Write the missing or outdated trainId label images under ``root``; returns how many were written.

    ``workers`` processes (None = all cores, but at most one per 64 annotations) convert the annotations
    in chunks.
    """
    root = Path(root)
    annotations = [path for pattern in ANNOTATION_GLOBS for path in sorted(root.glob(pattern))]
    if not annotations:
        raise DataError(
            f"no *_polygons.json annotations under {root}/gtFine/<split>/<city>/: is this the root of an "
            "extracted Cityscapes dataset (gtFine_trainvaltest.zip)?"
        )
    todo = [path for path in annotations if not _up_to_date(path)]
    logger.info("trainId labels: %d of %d to write under %s", len(todo), len(annotations), root)
    if not todo:
        return 0

    if workers is None:
        # A worker process pays off only with enough work: under spawn it starts in seconds (imports),
        # while one annotation converts in ~0.1 s.
        workers = min(os.cpu_count() or 1, max(1, len(todo) // ANNOTATIONS_PER_AUTO_WORKER))
    workers = min(workers, len(todo))
    with tqdm(total=len(todo), desc="trainId labels", unit="img", disable=not progress) as bar:
        if workers == 1:
            for path in todo:
                _convert(str(path))
                bar.update()
        else:
            context = multiprocessing.get_context(_start_method())
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                chunksize = max(1, min(64, len(todo) // (4 * workers)))
                for _ in pool.map(_convert, [str(path) for path in todo], chunksize=chunksize):
                    bar.update()
    return len(todo)


def _start_method() -> str:
    """fork starts workers in milliseconds with cityscapesscripts already imported (spawn: ~0.5 s each), but
    is only safe while no other thread may hold a lock the children need. tqdm's monitor thread is
    harmless (the children never touch tqdm); any other thread (Prefect's task runners, DataLoader
    pin-memory threads) means spawn."""
    others = [
        t for t in threading.enumerate() if t is not threading.main_thread() and not isinstance(t, TMonitor)
    ]
    return "spawn" if others else "fork"


def _up_to_date(polygons: Path) -> bool:
    """The output exists, is newer than its annotation and is a complete PNG."""
    output = trainid_path(polygons)
    try:
        if output.stat().st_mtime < polygons.stat().st_mtime:
            return False
        # A PNG cut off (a copy or an old writer interrupted) lacks its final IEND chunk.
        with output.open("rb") as handle:
            handle.seek(-len(_PNG_END), os.SEEK_END)
            return handle.read() == _PNG_END
    except OSError:  # missing, or shorter than the IEND chunk
        return False


def _convert(polygons: str) -> None:
    """One annotation -> its trainId PNG via cityscapesscripts' json2labelImg, renamed into place."""
    output = trainid_path(Path(polygons))
    # The temporary name keeps the .png suffix: PIL picks the format from it.
    tmp = output.with_name(f".{output.stem}.{os.getpid()}.tmp.png")
    try:
        json2labelImg(polygons, str(tmp), "trainIds")
        os.replace(tmp, output)
    except (Exception, SystemExit) as exc:  # cityscapesscripts exits on an unknown label
        raise DataError(
            f"cannot convert {polygons} to trainIds: {exc!r}; check the annotation file"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
