"""The Cityscapes label set as the benchmark scores it, derived from cityscapesscripts' own table."""

from __future__ import annotations

import numpy as np
from cityscapesscripts.helpers.labels import labels as _CITYSCAPES_LABELS

from components.config import IGNORE_INDEX

_EVALUATED = sorted(
    (label for label in _CITYSCAPES_LABELS if not label.ignoreInEval), key=lambda x: x.trainId
)

NUM_CLASSES = len(_EVALUATED)  # 19
CLASS_NAMES: tuple[str, ...] = tuple(label.name for label in _EVALUATED)
"""Class name of each trainId 0..18."""
PALETTE: tuple[tuple[int, int, int], ...] = tuple(tuple(label.color) for label in _EVALUATED)
"""RGB colour of each trainId, as cityscapesscripts draws it."""
TRAIN_ID_TO_LABEL_ID: tuple[int, ...] = tuple(label.id for label in _EVALUATED)
"""The labelId of each trainId: predictions for the official evaluator/server are labelIds."""
CATEGORIES: dict[str, tuple[int, ...]] = {}
for _label in _EVALUATED:
    CATEGORIES.setdefault(_label.category, ())
    CATEGORIES[_label.category] += (_label.trainId,)
"""The 7 evaluated categories (flat, construction, object, nature, sky, human, vehicle) -> trainIds."""


def trainid_to_labelid_lut() -> np.ndarray:
    """A 256-entry lookup table: trainId -> labelId (ignore and unknown values -> 0, 'unlabeled')."""
    lut = np.zeros(256, dtype=np.uint8)
    lut[: len(TRAIN_ID_TO_LABEL_ID)] = TRAIN_ID_TO_LABEL_ID
    return lut


def colorize(train_ids: np.ndarray) -> np.ndarray:
    """HxW trainIds -> HxWx3 uint8 RGB in the Cityscapes palette (ignore -> black)."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(PALETTE)] = PALETTE
    lut[IGNORE_INDEX] = (0, 0, 0)
    return lut[train_ids.astype(np.uint8)]
