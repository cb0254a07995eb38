"""Albumentations pipelines built from ``AugmentConfig`` alone (never from the recipe's name).

paper:  Resize(augment.resize) + HorizontalFlip + Normalize
strong: RandomScale(augment.scale_range) + PadIfNeeded/RandomCrop(augment.crop) + HorizontalFlip
        + ColorJitter + Normalize
Labels always use nearest-neighbour interpolation and are padded with the ignore value.
"""

from __future__ import annotations

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from components.config import AugmentConfig
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
