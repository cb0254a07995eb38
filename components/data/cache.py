"""Decode-once caches: uint8 memmaps beside the dataset, for data that is decoded again and again.

* Fixed-size training (the paper's Resize): decoding a 2048x1024 PNG costs far more than the training
  step needs from it once every frame is resized to the same size anyway, so each split is decoded and
  resized once (image: bilinear, label: nearest, as ``transforms.Resize`` does) into
  ``<root>/.cache/<split>_<H>x<W>_<key>.{images,labels}.u8``.
* Scoring saved predictions: the ground truth is the same for every model, so its trainId labels are
  decoded once at their own size into ``<root>/.cache/<split>_labels_<key>.labels.u8``.

The key hashes the files' names, sizes and modification times; a new cache deletes the one it replaces.
Builders serialise on a file lock (DDP ranks, concurrent scorers), write to temporary names and publish
a small JSON last, so a half-built cache is never read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from components.data.layout import read_image, read_label, read_png_header

logger = logging.getLogger(__name__)

CACHE_DIR = ".cache"


class SplitCache:
    """Read access to a built cache; the memmaps open lazily in each process (DataLoader workers)."""

    def __init__(self, base: Path, shapes: dict[str, tuple[int, ...]]) -> None:
        self.base, self.shapes = base, shapes
        self._arrays: dict[str, np.memmap] = {}

    def image(self, index: int) -> np.ndarray:
        """HxWx3 uint8 RGB (a writable copy)."""
        return np.array(self._array("images")[index])

    def label(self, index: int) -> np.ndarray:
        """HxW uint8 trainIds (a writable copy)."""
        return np.array(self._array("labels")[index])

    def _array(self, name: str) -> np.memmap:
        if name not in self._arrays:
            self._arrays[name] = np.memmap(f"{self.base}.{name}.u8", np.uint8, "r", shape=self.shapes[name])
        return self._arrays[name]

    def __getstate__(self) -> dict:
        return {"base": self.base, "shapes": self.shapes, "_arrays": {}}  # never pickle the mapped data


def open_split_cache(
    root: Path, split: str, pairs: list[tuple[Path, Path]], size: tuple[int, int], progress: bool = True
) -> SplitCache:
    """The split's frames resized to ``size`` (height, width), building the cache files if needed."""
    height, width = size
    key = _key(root, [path for pair in pairs for path in pair])
    base = Path(root) / CACHE_DIR / f"{split}_{height}x{width}_{key}"
    shapes = {"images": (len(pairs), height, width, 3), "labels": (len(pairs), height, width)}

    def fill(arrays: dict[str, np.memmap], index: int) -> None:
        image, label = pairs[index]
        dsize = (width, height)
        arrays["images"][index] = cv2.resize(read_image(image), dsize, interpolation=cv2.INTER_LINEAR)
        arrays["labels"][index] = cv2.resize(read_label(label), dsize, interpolation=cv2.INTER_NEAREST)

    def build() -> dict:
        logger.info("caching %d frames at %dx%d into %s.*.u8", len(pairs), width, height, base)
        _fill_memmaps(base, shapes, len(pairs), fill, progress)
        return {"count": len(pairs), "height": height, "width": width}

    _build_once(base, build)
    return SplitCache(base, shapes)


class LabelCache:
    """Label maps of one split at their own sizes, back to back in one memmap (read-only views)."""

    def __init__(self, base: Path, shapes: list[tuple[int, int]]) -> None:
        self.base, self.shapes = base, shapes
        self.offsets = np.cumsum([0, *(height * width for height, width in shapes)]).tolist()
        self._array: np.memmap | None = None

    def __len__(self) -> int:
        return len(self.shapes)

    def label(self, index: int) -> np.ndarray:
        """HxW uint8 trainIds, a read-only view of the mapped file."""
        if self._array is None:
            self._array = np.memmap(f"{self.base}.labels.u8", np.uint8, "r", shape=(self.offsets[-1],))
        return self._array[self.offsets[index] : self.offsets[index + 1]].reshape(self.shapes[index])


def open_label_cache(root: Path, split: str, labels: list[Path], progress: bool = True) -> LabelCache:
    """``labels`` (trainId PNGs under ``root``) decoded once at their own size, building the cache if needed.

    Raises OSError where ``root`` cannot hold the cache (read-only), DataError naming a label that does
    not decode.
    """
    base = Path(root) / CACHE_DIR / f"{split}_labels_{_key(root, labels)}"

    def build() -> dict:
        shapes = [(header.height, header.width) for header in map(read_png_header, labels)]
        offsets = LabelCache(base, shapes).offsets

        def fill(arrays: dict[str, np.memmap], index: int) -> None:
            arrays["labels"][offsets[index] : offsets[index + 1]] = read_label(labels[index]).reshape(-1)

        logger.info("caching %d ground-truth labels into %s.labels.u8", len(labels), base)
        _fill_memmaps(base, {"labels": (offsets[-1],)}, len(labels), fill, progress)
        return {"count": len(labels), "shapes": shapes}

    shapes = _build_once(base, build)["shapes"]
    return LabelCache(base, [tuple(shape) for shape in shapes])


def _key(root: Path, files: list[Path]) -> str:
    """Names, sizes and modification times: regenerated or replaced files get a new cache."""
    lines = []
    for path in files:
        stat = path.stat()
        lines.append(f"{path.relative_to(root)}\t{stat.st_size}\t{stat.st_mtime_ns}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()[:16]


def _build_once(base: Path, build: Callable[[], dict]) -> dict:
    """``<base>.json``, published from what ``build`` returns after it wrote the cache, unless it exists."""
    meta = base.with_suffix(".json")
    if not meta.is_file():
        meta.parent.mkdir(parents=True, exist_ok=True)
        with open(base.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another rank or process may be building it right now
            if not meta.is_file():
                tmp = meta.with_suffix(".json.tmp")
                tmp.write_text(json.dumps(build()))
                os.replace(tmp, meta)
                _remove_superseded(base)
    return json.loads(meta.read_text())


def _remove_superseded(base: Path) -> None:
    """Delete the published caches of the same kind with another key: changed files left them stale.

    They can be GBs; a process still reading one keeps its mapping (the data goes when it closes).
    """
    kind = base.name.rsplit("_", 1)[0]  # e.g. "train_768x1024" or "val_labels"
    for meta in base.parent.glob(f"{kind}_*.json"):
        stale = meta.with_suffix("")
        if stale.name != base.name and stale.name.rsplit("_", 1)[0] == kind:
            for path in [meta, stale.with_suffix(".lock"), *base.parent.glob(f"{stale.name}.*.u8")]:
                path.unlink(missing_ok=True)


def _fill_memmaps(
    base: Path,
    shapes: dict[str, tuple[int, ...]],
    count: int,
    fill: Callable[[dict[str, np.memmap], int], None],
    progress: bool,
) -> None:
    """Create ``<base>.<name>.u8`` for each of ``shapes`` by ``fill(arrays, i)`` for i < count, atomically."""
    tmp = {name: Path(f"{base}.{name}.u8.tmp") for name in shapes}
    arrays = {name: np.memmap(tmp[name], np.uint8, "w+", shape=shapes[name]) for name in shapes}
    try:
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # OpenCV decodes without the GIL
            jobs = pool.map(lambda index: fill(arrays, index), range(count))
            list(tqdm(jobs, total=count, desc="decode cache", disable=not progress))
        for name, array in arrays.items():
            array.flush()
            os.replace(tmp[name], f"{base}.{name}.u8")
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
