"""Albumentations pipelines built from ``AugmentConfig`` alone (never from the recipe's name).

paper:  Resize(augment.resize) + HorizontalFlip + Normalize
strong: RandomScale(augment.scale_range) + PadIfNeeded/RandomCrop(augment.crop) + HorizontalFlip
        + ColorJitter + Normalize
Labels always use nearest-neighbour interpolation and are padded with the ignore value.
``check_crop_fits`` refuses a crop the (scaled) training images cannot fill, before any work.
"""

from __future__ import annotations

import math
from pathlib import Path

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from components.config import AugmentConfig
from components.data.layout import IMAGE_SUFFIX, read_png_header
from components.errors import ConfigError
from components.labels import IGNORE_INDEX


def train_transform(augment: AugmentConfig) -> A.Compose:
    steps: list[A.BasicTransform] = []
    if augment.resize is not None:
        steps.append(_resize(augment.resize))
    if augment.scale_range is not None:
        low, high = augment.scale_range
        # Albumentations samples 1 + scale_limit, so shift the absolute range by one.
        steps.append(
            A.RandomScale(
                scale_limit=(low - 1.0, high - 1.0),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                p=1.0,
            )
        )
    if augment.crop is not None:
        height, width = augment.crop
        steps += [
            A.PadIfNeeded(
                min_height=height,
                min_width=width,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=IGNORE_INDEX,
            ),
            A.RandomCrop(height=height, width=width),
        ]
    if augment.hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    if augment.photometric:
        steps.append(A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, p=0.8))
    return _finish(steps, augment)


def eval_transform(augment: AugmentConfig, resize: tuple[int, int] | None = None) -> A.Compose:
    """No augmentation: full resolution unless ``resize`` (height, width) is given."""
    return _finish([_resize(resize)] if resize is not None else [], augment)


def _resize(size: tuple[int, int]) -> A.Resize:
    height, width = size
    return A.Resize(height, width, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST)


def _finish(steps: list[A.BasicTransform], augment: AugmentConfig) -> A.Compose:
    normalize = A.Normalize(mean=augment.mean, std=augment.std, max_pixel_value=255.0)
    return A.Compose([*steps, normalize, ToTensorV2()])


def check_crop_fits(augment: AugmentConfig, data_root: str | Path) -> None:
    """Refuse a random crop larger than the (resized, most upscaled) training images, before any work.

    Without ``augment.resize`` the size is read from the first training image's PNG header (Cityscapes
    frames all have one size); a missing split is left to the dataset's own check.
    """
    if augment.crop is None:
        return
    if augment.resize is not None:
        base, source = augment.resize, f"augment.resize={list(augment.resize)}"
    else:
        first_image = next(
            iter(sorted(Path(data_root, "leftImg8bit", "train").glob(f"*/*{IMAGE_SUFFIX}"))), None
        )
        if first_image is None:
            return
        header = read_png_header(first_image)
        base, source = (
            (header.height, header.width),
            f"{first_image} is {header.width}x{header.height} pixels",
        )
    max_scale = augment.scale_range[1] if augment.scale_range is not None else 1.0
    largest = (math.floor(base[0] * max_scale), math.floor(base[1] * max_scale))
    crop_height, crop_width = augment.crop
    if crop_height > largest[0] or crop_width > largest[1]:
        raise ConfigError(
            f"augment.crop={list(augment.crop)} (height, width) is larger than the training images "
            f"can give: {source}, so scaled by at most {max_scale} they are at most "
            f"[{largest[0]}, {largest[1]}] (height, width); the rest of each crop would be padding. "
            "Choose a smaller augment.crop (or a larger augment.scale_range / augment.resize)"
        )
