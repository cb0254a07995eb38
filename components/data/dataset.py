"""The Cityscapes fine-annotation split as a torch Dataset: leftImg8bit RGB + labelTrainIds."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import cv2
import torch
from torch.utils.data import Dataset

from components.config import AugmentConfig
from components.data.cache import CACHE_DIR, SplitCache, open_split_cache
from components.data.layout import read_image, read_label, split_pairs
from components.data.transforms import eval_transform
from components.errors import DataError

logger = logging.getLogger(__name__)


def worker_init_fn(_worker_id: int) -> None:
    """DataLoader workers already run in parallel: keep OpenCV from spawning threads in each of them."""
    cv2.setNumThreads(0)


class CityscapesSegmentation(Dataset):
    """``(image FloatTensor[3,H,W] normalized, label LongTensor[H,W])`` pairs of one split.

    ``cache_size`` (height, width): read frames already resized to that size from the decode-once
    cache (``cache.py``; build it on first use). For fixed-size training (``augment.resize``), whose
    Resize then has nothing left to do.

    ``transform`` is an Albumentations pipeline ending in ToTensorV2 (see ``transforms``); the default
    only normalizes with the ImageNet statistics at full resolution. The layout is validated on
    construction; label values are checked as each label is loaded.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Callable[..., dict] | None = None,
        *,
        cache_size: tuple[int, int] | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        pairs = split_pairs(self.root, split)
        self.image_paths: list[Path] = [image for image, _ in pairs]
        self.label_paths: list[Path] = [label for _, label in pairs]
        self.transform = transform if transform is not None else eval_transform(AugmentConfig())
        self.cache: SplitCache | None = None
        if cache_size is not None:
            try:
                self.cache = open_split_cache(self.root, split, pairs, cache_size)
            except OSError as exc:  # e.g. a read-only dataset: decode every time instead
                logger.warning("no decode cache in %s (%s): reading the PNGs", self.root / CACHE_DIR, exc)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is not None:
            image, label = self.cache.image(index), self.cache.label(index)
        else:
            image, label = read_image(self.image_paths[index]), read_label(self.label_paths[index])
        if image.shape[:2] != label.shape:
            raise DataError(
                f"size mismatch: {self.image_paths[index]} is {image.shape[1]}x{image.shape[0]} but "
                f"{self.label_paths[index]} is {label.shape[1]}x{label.shape[0]}"
            )
        sample = self.transform(image=image, mask=label)
        return sample["image"], sample["mask"].long()
