"""Checks that a directory holds a usable Cityscapes split, before any training time is spent on it.

The cheap checks read PNG headers only (pairs, sizes, label format); ``check_label_values`` decodes
every label and is what ``python -m components.data validate --values`` adds.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from components.errors import DataError
from components.labels import IGNORE_INDEX, NUM_CLASSES

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelTrainIds.png"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAX_LISTED = 5


@dataclass(frozen=True)
class PngHeader:
    width: int
    height: int
    bit_depth: int
    color_type: int  # 0 grey, 2 RGB, 3 palette, 4 grey+alpha, 6 RGBA


def read_png_header(path: Path) -> PngHeader:
    """Width, height and pixel format from a PNG's IHDR chunk; DataError if it is not a PNG."""
    try:
        with open(path, "rb") as file:
            head = file.read(26)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    if len(head) < 26 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise DataError(
            f"{path} is not a valid PNG file (corrupt or truncated): re-extract or re-download it"
        )
    width, height, bit_depth, color_type = struct.unpack(">IIBB", head[16:26])
    return PngHeader(width, height, bit_depth, color_type)


def split_pairs(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """(image, trainId label) pairs of a split, sorted, after the header checks; DataError names the files."""
    root = Path(root)
    image_dir, label_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    for directory in (image_dir, label_dir):
        if not directory.is_dir():
            raise DataError(
                f"split folder {directory} is missing: data.root must hold leftImg8bit/{split}/ and "
                f"gtFine/{split}/ (run `python -m components.data prepare` first)"
            )
    images = {_key(path, image_dir, IMAGE_SUFFIX): path for path in image_dir.glob(f"*/*{IMAGE_SUFFIX}")}
    labels = {_key(path, label_dir, LABEL_SUFFIX): path for path in label_dir.glob(f"*/*{LABEL_SUFFIX}")}
    if not images and not labels:
        raise DataError(f"split {split!r} is empty: no *{IMAGE_SUFFIX} under {image_dir}/<city>/")
    _no_strays(
        [images[key] for key in images.keys() - labels.keys()],
        "images without a trainId label",
        "run `python -m components.data trainids` or remove the images",
    )
    _no_strays(
        [labels[key] for key in labels.keys() - images.keys()],
        "trainId labels without an image",
        "restore the images or remove the labels",
    )
    pairs = [(images[key], labels[key]) for key in sorted(images)]
    for image, label in pairs:
        _check_pair(image, label)
    return pairs


def check_label_values(label: np.ndarray, path: Path) -> None:
    """DataError unless every value is a trainId 0-18 or the ignore value 255."""
    # The invalid values are one range (19-254): OpenCV's inRange is ~30x faster than a lookup table.
    bad = cv2.inRange(label, NUM_CLASSES, IGNORE_INDEX - 1)
    if cv2.countNonZero(bad):
        values = sorted(int(v) for v in np.unique(label[bad > 0]))[:10]
        raise DataError(
            f"{path} holds values {values} that are not trainIds "
            f"(0-{NUM_CLASSES - 1}, {IGNORE_INDEX} = ignore): "
            "regenerate it with `python -m components.data trainids`"
        )


def read_image(path: Path) -> np.ndarray:
    """An image file as HxWx3 uint8 RGB."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DataError(f"{path} cannot be decoded as an image (corrupt or truncated): re-extract it")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_label(path: Path) -> np.ndarray:
    """A trainId label PNG as HxW uint8, value-checked."""
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if label is None or label.ndim != 2 or label.dtype != np.uint8:
        raise DataError(f"{path} cannot be decoded as an 8-bit single-channel PNG: regenerate it")
    check_label_values(label, path)
    return label


def _key(path: Path, split_dir: Path, suffix: str) -> str:
    return str(path.relative_to(split_dir))[: -len(suffix)]


def _no_strays(paths: list[Path], what: str, advice: str) -> None:
    if paths:
        listed = ", ".join(str(path) for path in sorted(paths)[:_MAX_LISTED])
        more = f" and {len(paths) - _MAX_LISTED} more" if len(paths) > _MAX_LISTED else ""
        raise DataError(f"{len(paths)} {what}: {listed}{more}; {advice}")


def _check_pair(image: Path, label: Path) -> None:
    image_header, label_header = read_png_header(image), read_png_header(label)
    if image_header.color_type not in (2, 6) or image_header.bit_depth != 8:
        raise DataError(f"{image} is not an 8-bit RGB PNG (colour type {image_header.color_type})")
    if label_header.color_type != 0 or label_header.bit_depth != 8:
        raise DataError(f"{label} is not an 8-bit greyscale PNG of trainIds: regenerate it")
    if (image_header.width, image_header.height) != (label_header.width, label_header.height):
        raise DataError(
            f"size mismatch: {image} is {image_header.width}x{image_header.height} but {label} is "
            f"{label_header.width}x{label_header.height}"
        )
