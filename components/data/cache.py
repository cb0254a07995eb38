"""Decode-once cache for fixed-size training (the paper's Resize): uint8 memmaps beside the dataset.

Decoding a 2048x1024 PNG costs far more than the training step needs from it once every frame is
resized to the same size anyway, so each split is decoded and resized once (image: bilinear, label:
nearest, as ``transforms.Resize`` does) into ``<root>/.cache/<split>_<H>x<W>_<key>.{images,labels}.u8``;
the key hashes the split's file names and sizes. Builders serialise on a file lock (DDP ranks), write
to temporary names and publish a small JSON last, so a half-built cache is never read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from components.data.layout import read_image, read_label

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
    key = hashlib.sha256(
        "".join(f"{image.relative_to(root)}\t{image.stat().st_size}\t{label.stat().st_size}\n"
                for image, label in pairs).encode()
    ).hexdigest()[:16]  # fmt: skip
    base = Path(root) / CACHE_DIR / f"{split}_{height}x{width}_{key}"
    meta = base.with_suffix(".json")
    shapes = {"images": (len(pairs), height, width, 3), "labels": (len(pairs), height, width)}
    if not meta.is_file():
        meta.parent.mkdir(parents=True, exist_ok=True)
        with open(base.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another rank may be building it right now
            if not meta.is_file():
                _build(base, pairs, size, shapes, progress)
                tmp = meta.with_suffix(".json.tmp")
                tmp.write_text(json.dumps({"count": len(pairs), "height": height, "width": width}))
                os.replace(tmp, meta)
    return SplitCache(base, shapes)


def _build(
    base: Path,
    pairs: list[tuple[Path, Path]],
    size: tuple[int, int],
    shapes: dict[str, tuple[int, ...]],
    progress: bool,
) -> None:
    height, width = size
    tmp = {name: Path(f"{base}.{name}.u8.tmp") for name in shapes}
    arrays = {name: np.memmap(tmp[name], np.uint8, "w+", shape=shapes[name]) for name in shapes}

    def fill(index: int) -> None:
        image, label = pairs[index]
        arrays["images"][index] = cv2.resize(
            read_image(image), (width, height), interpolation=cv2.INTER_LINEAR
        )
        arrays["labels"][index] = cv2.resize(
            read_label(label), (width, height), interpolation=cv2.INTER_NEAREST
        )

    logger.info("caching %d frames at %dx%d into %s.*.u8", len(pairs), width, height, base)
    try:
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # OpenCV decodes without the GIL
            list(
                tqdm(
                    pool.map(fill, range(len(pairs))),
                    total=len(pairs),
                    desc="decode cache",
                    disable=not progress,
                )
            )
        for name, array in arrays.items():
            array.flush()
            os.replace(tmp[name], f"{base}.{name}.u8")
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
