"""The plain-data label table equals cityscapesscripts' own, entry by entry."""

from __future__ import annotations

import numpy as np
from cityscapesscripts.helpers.labels import labels as cityscapes_labels

from components import labels


def test_evaluated_labels_equal_cityscapesscripts():
    official = sorted((lab for lab in cityscapes_labels if not lab.ignoreInEval), key=lambda lab: lab.trainId)
    ours = [(x.train_id, x.label_id, x.name, x.category, x.color) for x in labels.EVALUATED_LABELS]
    assert ours == [(x.trainId, x.id, x.name, x.category, tuple(x.color)) for x in official]
    ignored = {lab.trainId for lab in cityscapes_labels if lab.ignoreInEval and lab.trainId not in (-1,)}
    assert ignored == {labels.IGNORE_INDEX}


def test_categories_cover_every_class_once():
    assert sorted(t for ids in labels.CATEGORIES.values() for t in ids) == list(range(labels.NUM_CLASSES))
    assert len(labels.CATEGORIES) == 7


def test_colorize_and_labelid_lut():
    ids = np.array([[0, 18, labels.IGNORE_INDEX, 40]], dtype=np.uint8)
    assert labels.colorize(ids).tolist() == [[[128, 64, 128], [119, 11, 32], [0, 0, 0], [0, 0, 0]]]
    assert labels.trainid_to_labelid_lut()[ids].tolist() == [[7, 33, 0, 0]]
