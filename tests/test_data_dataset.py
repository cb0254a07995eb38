"""Dataset + transforms on the synthetic data, and every bad-layout case as a DataError naming the file."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import name2label

from components.config import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig
from components.data.__main__ import main
from components.data.cache import CACHE_DIR, open_label_cache
from components.data.dataset import CityscapesSegmentation, worker_init_fn
from components.data.layout import check_label_values, read_label
from components.data.transforms import eval_transform, train_transform
from components.errors import DataError

PLAIN = AugmentConfig(resize=None, scale_range=None, crop=None, hflip=False, photometric=False)


def test_samples_have_shapes_dtypes_normalization_and_ignore(synthetic_root: Path) -> None:
    dataset = CityscapesSegmentation(synthetic_root, "val")
    assert len(dataset) == 4 and len(dataset.label_paths) == 4
    image, label = dataset[0]
    assert image.dtype == torch.float32 and image.shape == (3, 64, 128)
    assert label.dtype == torch.int64 and label.shape == (64, 128)

    rgb = cv2.cvtColor(cv2.imread(str(dataset.image_paths[0])), cv2.COLOR_BGR2RGB)
    expected = (rgb / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), expected, atol=1e-5)

    label_ids_path = str(dataset.label_paths[0]).replace("_labelTrainIds", "_labelIds")
    label_ids = cv2.imread(label_ids_path, cv2.IMREAD_UNCHANGED)
    void = np.isin(label_ids, [name2label["ego vehicle"].id, name2label["out of roi"].id])
    assert void.any() and (label.numpy()[void] == 255).all()
    assert set(np.unique(label.numpy())) <= set(range(19)) | {255}
    assert (label.numpy()[label_ids == name2label["sky"].id] == name2label["sky"].trainId).all()


def test_flip_moves_image_and_label_together(synthetic_root: Path) -> None:
    plain = CityscapesSegmentation(synthetic_root, "train", transform=eval_transform(PLAIN))
    flipping = CityscapesSegmentation(
        synthetic_root, "train", transform=train_transform(PLAIN.model_copy(update={"hflip": True}))
    )
    image, label = plain[1]
    outcomes = set()
    for _ in range(30):
        flipped_image, flipped_label = flipping[1]
        is_flipped = not torch.equal(flipped_label, label)
        if is_flipped:
            assert torch.equal(flipped_label, torch.from_numpy(np.fliplr(label.numpy()).copy()))
            assert torch.equal(flipped_image, torch.flip(image, dims=[2]))
        else:
            assert torch.equal(flipped_image, image)
        outcomes.add(is_flipped)
    assert outcomes == {True, False}


def test_paper_resize_uses_nearest_labels(synthetic_root: Path) -> None:
    paper = AugmentConfig(resize=(32, 48), scale_range=None, crop=None, hflip=True, photometric=False)
    dataset = CityscapesSegmentation(synthetic_root, "train", transform=train_transform(paper))
    original = set(np.unique(CityscapesSegmentation(synthetic_root, "train")[0][1].numpy()))
    image, label = dataset[0]
    assert image.shape == (3, 32, 48) and label.shape == (32, 48)
    assert set(np.unique(label.numpy())) <= original


def test_strong_scale_pad_crop_fills_ignore(synthetic_root: Path) -> None:
    strong = AugmentConfig(
        resize=None, scale_range=(0.5, 0.75), crop=(96, 160), hflip=True, photometric=False
    )
    dataset = CityscapesSegmentation(synthetic_root, "train", transform=train_transform(strong))
    original = set(np.unique(CityscapesSegmentation(synthetic_root, "train")[2][1].numpy()))
    image, label = dataset[2]
    assert image.shape == (3, 96, 160) and label.shape == (96, 160)
    # the scaled frame is at most 48x96: the rest is padding, ignored in the label and 0 before Normalize
    assert (label == 255).float().mean() > 0.6
    assert set(np.unique(label.numpy())) <= original | {255}
    padded = (image.permute(1, 2, 0).numpy() * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN))[0, 0]
    np.testing.assert_allclose(padded, 0, atol=1e-5)


def test_eval_transform_resizes_only_when_asked(synthetic_root: Path) -> None:
    image, label = CityscapesSegmentation(synthetic_root, "val", transform=eval_transform(PLAIN, (32, 64)))[0]
    assert image.shape == (3, 32, 64) and label.shape == (32, 64)


def test_worker_init_disables_opencv_threads() -> None:
    threads = cv2.getNumThreads()
    try:
        worker_init_fn(0)
        assert cv2.getNumThreads() == 1  # 0 = no worker threads: OpenCV reports the calling thread only
    finally:
        cv2.setNumThreads(threads)


@pytest.fixture
def copy(synthetic_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "copy"
    for name in ("leftImg8bit", "gtFine"):
        shutil.copytree(synthetic_root / name, root / name)
    return root


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _first(root: Path, pattern: str) -> Path:
    return sorted(root.glob(pattern))[0]


def _missing_split(root: Path) -> tuple[str, str]:
    return "test", str(root / "leftImg8bit" / "test")


def _image_without_label(root: Path) -> tuple[str, str]:
    label = _first(root, "gtFine/val/*/*_labelTrainIds.png")
    label.unlink()
    return "val", str(label).replace("gtFine", "leftImg8bit", 1).replace(
        "_gtFine_labelTrainIds", "_leftImg8bit"
    )


def _label_without_image(root: Path) -> tuple[str, str]:
    image = _first(root, "leftImg8bit/val/*/*.png")
    image.unlink()
    return "val", str(image).replace("leftImg8bit", "gtFine", 1).replace(
        "_leftImg8bit", "_gtFine_labelTrainIds"
    )


def _corrupt_png(root: Path) -> tuple[str, str]:
    image = _first(root, "leftImg8bit/val/*/*.png")
    image.write_bytes(b"definitely not a png")
    return "val", str(image)


def _size_mismatch(root: Path) -> tuple[str, str]:
    label = _first(root, "gtFine/val/*/*_labelTrainIds.png")
    cv2.imwrite(str(label), np.zeros((32, 64), np.uint8))
    return "val", str(label)


def _empty_split(root: Path) -> tuple[str, str]:
    for name in ("leftImg8bit", "gtFine"):
        shutil.rmtree(root / name / "val")
        (root / name / "val").mkdir()
    return "val", "empty"


@pytest.mark.parametrize(
    "damage",
    [_missing_split, _image_without_label, _label_without_image, _corrupt_png, _size_mismatch, _empty_split],
)
def test_bad_layout_raises_data_error_naming_the_file(copy: Path, damage) -> None:
    split, named = damage(copy)
    before = _snapshot(copy)
    with pytest.raises(DataError) as error:
        CityscapesSegmentation(copy, split)
    assert named in str(error.value)
    assert _snapshot(copy) == before


def test_label_values_out_of_range_are_reported_on_load(copy: Path, capsys) -> None:
    label = _first(copy, "gtFine/val/*/*_labelTrainIds.png")
    values = cv2.imread(str(label), cv2.IMREAD_UNCHANGED)
    values[:4, :4] = 40
    cv2.imwrite(str(label), values)
    before = _snapshot(copy)
    dataset = CityscapesSegmentation(copy, "val")
    with pytest.raises(DataError, match=rf"{label}.*\[40\]"):
        dataset[dataset.label_paths.index(label)]
    assert main(["validate", "--root", str(copy), "--split", "val"]) == 0
    assert main(["validate", "--root", str(copy), "--split", "val", "--values"]) == 1
    assert str(label) in capsys.readouterr().err
    assert _snapshot(copy) == before


def test_decode_cache_gives_identical_samples_and_is_built_once(copy: Path) -> None:
    paper = AugmentConfig(resize=(32, 48), scale_range=None, crop=None, hflip=False, photometric=False)
    plain = CityscapesSegmentation(copy, "train", transform=train_transform(paper))
    cached = CityscapesSegmentation(copy, "train", transform=train_transform(paper), cache_size=(32, 48))
    assert cached.cache is not None
    for index in range(len(plain)):
        for ours, reference in zip(cached[index], plain[index], strict=True):
            assert torch.equal(ours, reference)
    cache_files = sorted((copy / CACHE_DIR).glob("train_32x48_*"))
    assert [p.name.split(".", 1)[1] for p in cache_files] == ["images.u8", "json", "labels.u8", "lock"]
    built = {p: p.stat().st_mtime_ns for p in cache_files}

    again = pickle.loads(pickle.dumps(CityscapesSegmentation(copy, "train", cache_size=(32, 48))))
    assert {p: p.stat().st_mtime_ns for p in cache_files} == built, "an existing cache is reused"
    assert len(pickle.dumps(again)) < 20_000, "DataLoader workers must not receive the mapped pixels"
    assert again[0][1].shape == (32, 48)


def test_label_value_check_bounds() -> None:
    label = np.array([[0, 18, 255]], np.uint8)
    check_label_values(label, Path("fine.png"))
    for bad in (19, 254):
        with pytest.raises(DataError, match=rf"odd\.png holds values \[{bad}\]"):
            check_label_values(np.array([[0, bad, 255]], np.uint8), Path("odd.png"))


def test_label_cache_holds_the_labels_at_their_size_and_follows_changes(copy: Path) -> None:
    labels = sorted((copy / "gtFine" / "val").glob("*/*_labelTrainIds.png"))
    cache = open_label_cache(copy, "val", labels, progress=False)
    assert len(cache) == len(labels)
    for index, path in enumerate(labels):
        assert np.array_equal(cache.label(index), read_label(path))
    files = sorted((copy / CACHE_DIR).glob("val_labels_*"))
    assert [p.name.split(".", 1)[1] for p in files] == ["json", "labels.u8", "lock"]
    built = {p: p.stat().st_mtime_ns for p in files}
    open_label_cache(copy, "val", labels, progress=False)
    assert {p: p.stat().st_mtime_ns for p in files} == built, "an existing cache is reused"

    CityscapesSegmentation(copy, "val", cache_size=(32, 48))  # a training cache of the same split
    training = sorted((copy / CACHE_DIR).glob("val_32x48_*"))
    assert training

    # A regenerated label (same size on disk or not) gets a new cache with its new pixels.
    changed = read_label(labels[1])
    changed[:3, :5] = 7
    cv2.imwrite(str(labels[1]), changed)
    before = cache.label(0).copy()
    again = open_label_cache(copy, "val", labels, progress=False)
    assert again.base != cache.base
    assert np.array_equal(again.label(1), changed)
    assert np.array_equal(again.label(0), before)
    # The superseded cache is deleted; the split's training cache (another kind) is left alone.
    assert not any(path.exists() for path in files)
    assert all(path.exists() for path in training)
    assert sorted(p.name.split(".", 1)[1] for p in (copy / CACHE_DIR).glob("val_labels_*")) == [
        "json",
        "labels.u8",
        "lock",
    ]
