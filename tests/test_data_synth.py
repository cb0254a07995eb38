"""Synthetic Cityscapes: deterministic, in the real layout, annotations cityscapesscripts can read."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from cityscapesscripts.helpers.annotation import Annotation
from cityscapesscripts.helpers.labels import name2label

from components.data.__main__ import main
from components.data.synth import TRAIN_CITIES, VAL_CITIES, generate_synthetic_cityscapes

GT_SUFFIXES = (
    "_gtFine_polygons.json",
    "_gtFine_labelIds.png",
    "_gtFine_instanceIds.png",
    "_gtFine_color.png",
)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    kwargs = dict(train=3, val=2, height=32, width=64, cities=2)
    first = _files(generate_synthetic_cityscapes(tmp_path / "a", seed=7, **kwargs))
    second = _files(generate_synthetic_cityscapes(tmp_path / "b", seed=7, **kwargs))
    other = _files(generate_synthetic_cityscapes(tmp_path / "c", seed=8, **kwargs))
    assert first == second
    assert first.keys() == other.keys()
    assert sum(first[name] != other[name] for name in first) == len(first)


def test_layout_names_and_sizes(tmp_path: Path) -> None:
    root = generate_synthetic_cityscapes(tmp_path, train=4, val=3, height=32, width=64, cities=2, seed=0)
    images = sorted(root.glob("leftImg8bit/*/*/*_leftImg8bit.png"))
    assert len(images) == 7
    cities = {
        split: {p.parent.name for p in root.glob(f"leftImg8bit/{split}/*/*.png")}
        for split in ("train", "val")
    }
    assert cities == {"train": set(TRAIN_CITIES[:2]), "val": set(VAL_CITIES[:2])}
    assert (root / "leftImg8bit/train/aachen/aachen_000001_000019_leftImg8bit.png").is_file()
    for image in images:
        split, city = image.parent.parent.name, image.parent.name
        stem = image.name.removesuffix("_leftImg8bit.png")
        assert stem.startswith(f"{city}_") and len(stem.split("_")[1]) == 6
        for suffix in GT_SUFFIXES:
            assert (root / "gtFine" / split / city / f"{stem}{suffix}").is_file()
        assert cv2.imread(str(image)).shape == (32, 64, 3)
        instance = cv2.imread(str(root / "gtFine" / split / city / f"{stem}_gtFine_instanceIds.png"), -1)
        assert instance.dtype == np.uint16 and instance.shape == (32, 64)


def test_polygons_parse_and_label_images_hold_void_and_main_classes(tmp_path: Path) -> None:
    root = generate_synthetic_cityscapes(tmp_path, train=4, val=1, height=64, width=128, seed=0)
    seen_labels: set[str] = set()
    seen_ids: set[int] = set()
    for polygons in sorted(root.glob("gtFine/*/*/*_polygons.json")):
        annotation = Annotation()
        annotation.fromJsonFile(str(polygons))
        assert (annotation.imgWidth, annotation.imgHeight) == (128, 64)
        for obj in annotation.objects:
            assert obj.label in name2label or obj.label.removesuffix("group") in name2label
            assert all(0 <= p.x < 128 and 0 <= p.y < 64 for p in obj.polygon)
        seen_labels |= {obj.label for obj in annotation.objects}
        label_ids = cv2.imread(str(polygons).replace("_polygons.json", "_labelIds.png"), cv2.IMREAD_UNCHANGED)
        seen_ids |= set(np.unique(label_ids).tolist())
    assert {"sky", "building", "road", "sidewalk", "vegetation", "car", "person", "pole"} <= seen_labels
    assert {"out of roi", "ego vehicle", "license plate"} <= seen_labels
    void_ids = {name2label["ego vehicle"].id, name2label["out of roi"].id}
    main_ids = {name2label[name].id for name in ("sky", "building", "road", "sidewalk", "car", "person")}
    assert void_ids <= seen_ids and main_ids <= seen_ids


def test_trainids_mark_void_polygons_ignored(synthetic_root: Path) -> None:
    for label_ids_path in sorted(synthetic_root.glob("gtFine/*/*/*_labelIds.png"))[:4]:
        label_ids = cv2.imread(str(label_ids_path), cv2.IMREAD_UNCHANGED)
        train_ids = cv2.imread(
            str(label_ids_path).replace("_labelIds", "_labelTrainIds"), cv2.IMREAD_UNCHANGED
        )
        void = np.isin(label_ids, [name2label["ego vehicle"].id, name2label["out of roi"].id])
        assert void.any() and (train_ids[void] == 255).all()
        assert (train_ids[label_ids == name2label["road"].id] == name2label["road"].trainId).all()


def test_rgb_follows_the_polygons(tmp_path: Path) -> None:
    """Sky is brighter and bluer than road in every frame: the image is rendered from the labels."""
    root = generate_synthetic_cityscapes(tmp_path, train=3, val=1, height=64, width=128, seed=1)
    for image_path in root.glob("leftImg8bit/*/*/*.png"):
        rgb = cv2.cvtColor(cv2.imread(str(image_path)), cv2.COLOR_BGR2RGB).astype(float)
        gt = str(image_path).replace("leftImg8bit/", "gtFine/").replace("_leftImg8bit", "_gtFine_labelIds")
        label_ids = cv2.imread(gt, cv2.IMREAD_UNCHANGED)
        sky, road = rgb[label_ids == name2label["sky"].id], rgb[label_ids == name2label["road"].id]
        assert sky[:, 2].mean() > road[:, 2].mean() + 30


def test_cli_synth(tmp_path: Path, capsys) -> None:
    assert (
        main(
            ["synth", "--out", str(tmp_path), "--train", "2", "--val", "1", "--height", "16", "--width", "32"]
        )
        == 0
    )
    assert len(list(tmp_path.glob("leftImg8bit/*/*/*.png"))) == 3
    assert str(tmp_path) in capsys.readouterr().out
