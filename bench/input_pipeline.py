"""Training input pipeline: images/s per core delivered to the model (decode + augment + collate).

Reference = the paper's pipeline: a Dataset that PIL-opens the full-size PNG and its label for every
item and applies ``Resize + HorizontalFlip + Normalize`` + to-tensor, ``DataLoader`` defaults
(``num_workers=0``). Ours = ``CityscapesSegmentation`` with the decode-once cache (``cache_size``) and
``train_transform`` of the recipe. Both run in this process with one thread (per core), epoch by epoch,
interleaved. For ``strong`` (random scale + crop: no fixed size to cache) both decode the full PNG
(OpenCV vs PIL) and run the recipe's transforms.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from bench.common import Row, make_row, side_by_side, single_core
from components.config import load_config
from components.data.cache import CACHE_DIR
from components.data.dataset import CityscapesSegmentation
from components.data.transforms import train_transform

PAPER_TARGET = (">=", 3.0)


class PaperDataset(Dataset):
    """The paper's dataset: PIL decode of the full-size image and label on every access."""

    def __init__(self, image_paths: list[Path], label_paths: list[Path], transform: A.Compose) -> None:
        self.image_paths, self.label_paths, self.transform = image_paths, label_paths, transform

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = np.array(Image.open(self.image_paths[index]).convert("RGB"))
        label = np.array(Image.open(self.label_paths[index]))
        sample = self.transform(image=image, mask=label)
        return sample["image"], sample["mask"].long()


def paper_transform(resize: tuple[int, int]) -> A.Compose:
    """The paper's Albumentations pipeline (library defaults: bilinear, p=0.5 flip, ImageNet stats)."""
    return A.Compose([A.Resize(*resize), A.HorizontalFlip(), A.Normalize(), ToTensorV2()])


def bench_input_pipeline(root: Path, recipe: str, *, repeats: int = 3) -> Row:
    """images/s per core, ours vs the paper's pipeline, for ``recipe`` (``paper`` or ``strong``)."""
    cfg = load_config(recipe)
    augment = cfg.augment
    notes = []
    with single_core():
        if augment.resize is not None:
            build_seconds = _fresh_cache_build(root, augment.resize)
            ours_set = CityscapesSegmentation(
                root, "train", train_transform(augment), cache_size=augment.resize
            )
            reference_transform = paper_transform(augment.resize)
            notes.append(f"one-off cache build {build_seconds:.1f} s (all cores)")
        else:
            build_seconds = 0.0
            ours_set = CityscapesSegmentation(root, "train", train_transform(augment))
            reference_transform = train_transform(augment)
        reference_set = PaperDataset(ours_set.image_paths, ours_set.label_paths, reference_transform)
        identical = _same_samples(ours_set, reference_set)
        batch = min(cfg.train.global_batch_size, len(ours_set))
        ours_loader = DataLoader(ours_set, batch, shuffle=True, pin_memory=torch.cuda.is_available())
        reference_loader = DataLoader(reference_set, batch, shuffle=True)
        ours_s, reference_s = side_by_side(
            lambda: _epoch(ours_loader), lambda: _epoch(reference_loader), repeats
        )
    count = len(ours_set)
    if build_seconds:
        notes.append(f"epoch 1 incl. cache build {count / (build_seconds + ours_s):.1f} images/s")
    notes.append(f"{count} frames {_frame_size(ours_set)}, batch {batch}, median of {repeats} epochs")
    return make_row(
        f"input pipeline, {recipe} recipe (per core)",
        "images/s",
        count / ours_s,
        count / reference_s,
        identical,
        PAPER_TARGET if recipe == "paper" else None,
        "; ".join(notes),
    )


def _fresh_cache_build(root: Path, size: tuple[int, int]) -> float:
    """Seconds to build the split's cache from scratch (any earlier one at this size is removed)."""
    height, width = size
    for path in (Path(root) / CACHE_DIR).glob(f"train_{height}x{width}_*"):
        path.unlink() if path.is_file() else shutil.rmtree(path)
    start = time.perf_counter()
    CityscapesSegmentation(root, "train", cache_size=size)
    return time.perf_counter() - start


def _same_samples(ours: CityscapesSegmentation, reference: PaperDataset, count: int = 3) -> bool:
    """The first frames through both pipelines, with the same augmentation seed, are equal tensors."""
    ours.transform.set_random_seed(0)
    reference.transform.set_random_seed(0)
    for index in range(min(count, len(ours))):
        (image, label), (ref_image, ref_label) = ours[index], reference[index]
        if not (torch.equal(image, ref_image) and torch.equal(label, ref_label)):
            return False
    return True


def _epoch(loader: DataLoader) -> None:
    for _images, _labels in loader:
        pass


def _frame_size(dataset: CityscapesSegmentation) -> str:
    with Image.open(dataset.image_paths[0]) as image:
        return f"{image.width}x{image.height}"
