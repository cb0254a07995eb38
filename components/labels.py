"""The Cityscapes label set as the benchmark scores it, as plain data.

The table is written out rather than imported from cityscapesscripts so that the serving model (which
bundles this module) needs nothing but numpy; ``tests/test_labels.py`` checks it against
``cityscapesscripts.helpers.labels`` entry by entry.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

IGNORE_INDEX = 255
"""trainId of pixels the benchmark does not score (void labels, padding)."""


class EvaluatedLabel(NamedTuple):
    train_id: int
    label_id: int
    name: str
    category: str
    color: tuple[int, int, int]


EVALUATED_LABELS: tuple[EvaluatedLabel, ...] = (
    EvaluatedLabel(0, 7, "road", "flat", (128, 64, 128)),
    EvaluatedLabel(1, 8, "sidewalk", "flat", (244, 35, 232)),
    EvaluatedLabel(2, 11, "building", "construction", (70, 70, 70)),
    EvaluatedLabel(3, 12, "wall", "construction", (102, 102, 156)),
    EvaluatedLabel(4, 13, "fence", "construction", (190, 153, 153)),
    EvaluatedLabel(5, 17, "pole", "object", (153, 153, 153)),
    EvaluatedLabel(6, 19, "traffic light", "object", (250, 170, 30)),
    EvaluatedLabel(7, 20, "traffic sign", "object", (220, 220, 0)),
    EvaluatedLabel(8, 21, "vegetation", "nature", (107, 142, 35)),
    EvaluatedLabel(9, 22, "terrain", "nature", (152, 251, 152)),
    EvaluatedLabel(10, 23, "sky", "sky", (70, 130, 180)),
    EvaluatedLabel(11, 24, "person", "human", (220, 20, 60)),
    EvaluatedLabel(12, 25, "rider", "human", (255, 0, 0)),
    EvaluatedLabel(13, 26, "car", "vehicle", (0, 0, 142)),
    EvaluatedLabel(14, 27, "truck", "vehicle", (0, 0, 70)),
    EvaluatedLabel(15, 28, "bus", "vehicle", (0, 60, 100)),
    EvaluatedLabel(16, 31, "train", "vehicle", (0, 80, 100)),
    EvaluatedLabel(17, 32, "motorcycle", "vehicle", (0, 0, 230)),
    EvaluatedLabel(18, 33, "bicycle", "vehicle", (119, 11, 32)),
)
"""The 19 evaluated classes in trainId order (cityscapesscripts' labels with ignoreInEval=False)."""

NUM_CLASSES = len(EVALUATED_LABELS)  # 19
CLASS_NAMES: tuple[str, ...] = tuple(label.name for label in EVALUATED_LABELS)
"""Class name of each trainId 0..18."""
PALETTE: tuple[tuple[int, int, int], ...] = tuple(label.color for label in EVALUATED_LABELS)
"""RGB colour of each trainId, as cityscapesscripts draws it."""
TRAIN_ID_TO_LABEL_ID: tuple[int, ...] = tuple(label.label_id for label in EVALUATED_LABELS)
"""The labelId of each trainId: predictions for the official evaluator/server are labelIds."""
CATEGORIES: dict[str, tuple[int, ...]] = {}
for _label in EVALUATED_LABELS:
    CATEGORIES[_label.category] = (*CATEGORIES.get(_label.category, ()), _label.train_id)
"""The 7 evaluated categories (flat, construction, object, nature, sky, human, vehicle) -> trainIds."""


def trainid_to_labelid_lut() -> np.ndarray:
    """A 256-entry lookup table: trainId -> labelId (ignore and unknown values -> 0, 'unlabeled')."""
    lut = np.zeros(256, dtype=np.uint8)
    lut[:NUM_CLASSES] = TRAIN_ID_TO_LABEL_ID
    return lut


def colorize(train_ids: np.ndarray) -> np.ndarray:
    """HxW trainIds -> HxWx3 uint8 RGB in the Cityscapes palette (ignore and unknown -> black)."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:NUM_CLASSES] = PALETTE
    return lut[train_ids.astype(np.uint8)]
