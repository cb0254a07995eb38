"""What batch inference reads: listing the inputs (folder, glob, s3:// prefix), refusing colliding output
names, and checking every image fully before anything is written (corrupt, unsupported, too large). The
check reads each file once and keeps what it learned (:class:`ImageFacts`: format, size, EXIF
orientation, content hash) for segmenting and the manifest."""

from __future__ import annotations

import glob
import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components import storage
from components.data.layout import PNG_SIGNATURE
from components.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


EXIF_ORIENTATION = 0x0112
"""The EXIF tag that says how to turn the stored pixels to show them upright."""

MAX_PIXELS = 40_000_000
"""Largest input accepted (about 8K x 5K, 20 Cityscapes frames): tiling sums one float32 logit per class
and pixel, so memory grows with the image; larger ones are refused before anything is decoded."""


@dataclass(frozen=True)
class InputRef:
    source: str
    """The input as the user named it (a local path or an s3:// URI): the manifest's key."""
    relative: str
    """Output name relative to the output folders (keeps the input's sub-folders, e.g. cities)."""


def list_inputs(inputs: str) -> list[InputRef]:
    """The files to segment (nothing downloaded): a folder (recursively, hidden files left out), a glob
    pattern, one file or an s3:// prefix. Unreadable entries (broken links) are listed too: they are
    named as bad inputs rather than silently left out."""
    if storage.is_s3(inputs):
        return _list_prefix(inputs)
    root = Path(inputs)
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if (p.is_file() or p.is_symlink()) and not _hidden(p, root))
        found = [InputRef(str(p), _output_name(p.relative_to(root).as_posix())) for p in files]
    elif root.is_file():
        found = [InputRef(str(root), _output_name(root.name))]
    else:
        found = [InputRef(p, _output_name(Path(p).name)) for p in sorted(glob.glob(inputs))]
    if not found:
        raise DataError(f"no input files at {inputs}: pass a folder, a glob pattern or an s3:// prefix")
    return found


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _output_name(relative: str) -> str:
    return str(Path(relative).with_suffix(".png").as_posix())


def _list_prefix(uri: str) -> list[InputRef]:
    bucket, prefix = storage.split_s3(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    pages = storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    keys = sorted(
        obj["Key"] for page in pages for obj in page.get("Contents", []) if not obj["Key"].endswith("/")
    )
    if not keys:
        raise DataError(f"no objects under {uri}")
    return [InputRef(f"s3://{bucket}/{key}", _output_name(key[len(prefix) :])) for key in keys]


def check_collisions(refs: list[InputRef]) -> None:
    """Refuse inputs whose outputs would overwrite each other (``x.jpg`` and ``x.webp``), naming them."""
    by_output: dict[str, list[str]] = {}
    for ref in refs:
        by_output.setdefault(ref.relative, []).append(ref.source)
    clashes = {name: sources for name, sources in by_output.items() if len(sources) > 1}
    if clashes:
        raise DataError(
            f"{len(clashes)} output name(s) would be written by more than one input (nothing was written; "
            "rename or move one of each):\n  "
            + "\n  ".join(f"{name} <- {' and '.join(sources)}" for name, sources in clashes.items())
        )


FETCH_THREADS = 16
"""Concurrent downloads of s3:// inputs: one GET waits tens of ms on the network, so one at a time would
starve a GPU (about 30 objects/s); Pillow's decoding releases the GIL, so checks run side by side too."""


def fetch_inputs(refs: list[InputRef], scratch: Path) -> dict[str, Path]:
    """input -> a local file with its bytes: the path itself, or the s3:// object downloaded into
    ``scratch`` (the one download of that object in this run: checking and segmenting both read it)."""

    def fetch(ref: InputRef) -> Path:
        if storage.is_s3(ref.source):
            return storage.copy_to_local(ref.source, scratch / ref.source[len("s3://") :])
        return Path(ref.source)

    with ThreadPoolExecutor(FETCH_THREADS) as pool:
        return dict(zip([ref.source for ref in refs], pool.map(fetch, refs), strict=True))


@dataclass(frozen=True)
class ImageFacts:
    """What the check learned about an input; segmenting uses it (batching by size) and the manifest
    records it (what exactly was segmented)."""

    format: str
    """Pillow's name of the format (PNG, JPEG, WEBP, ...)."""
    width: int
    height: int
    """The size as stored (before EXIF orientation)."""
    exif_orientation: int
    """The EXIF Orientation tag (1: none; 5 to 8 turn the image by 90 degrees)."""
    size_bytes: int
    sha256: str
    """Of the file's bytes: the input that was segmented, whatever its name says later."""

    @property
    def upright_size(self) -> tuple[int, int]:
        """(width, height) as the image is shown (and segmented): EXIF orientation applied."""
        return (
            (self.height, self.width) if self.exif_orientation in (5, 6, 7, 8) else (self.width, self.height)
        )


class BadInput(ValueError):
    """An input that cannot be segmented; the message says why."""


def examine_inputs(
    local: dict[str, Path], max_pixels: int = MAX_PIXELS
) -> tuple[dict[str, ImageFacts], dict[str, str]]:
    """The facts of every good input of ``local`` (input -> local file) and why each bad one cannot be
    segmented (input -> reason)."""

    def examine(path: Path) -> ImageFacts | str:
        try:
            return image_facts(path, max_pixels)
        except BadInput as exc:
            return str(exc)

    with ThreadPoolExecutor(FETCH_THREADS) as pool:
        found = dict(zip(local, pool.map(examine, local.values()), strict=True))
    facts = {source: found for source, found in found.items() if isinstance(found, ImageFacts)}
    return facts, {source: found for source, found in found.items() if isinstance(found, str)}


def refuse(problems: dict[str, str]) -> None:
    """The DataError naming every bad input (raised before anything is written)."""
    raise DataError(
        f"{len(problems)} input file(s) cannot be segmented (nothing was written; --skip-bad skips "
        "them and lists them in the manifest):\n  "
        + "\n  ".join(f"{source}: {problem}" for source, problem in problems.items())
    )


def inspect_image(path: Path, max_pixels: int = MAX_PIXELS) -> str | None:
    """Why ``path`` cannot be segmented (None if it can); see :func:`image_facts`."""
    try:
        image_facts(path, max_pixels)
    except BadInput as exc:
        return str(exc)
    return None


def image_facts(path: Path, max_pixels: int = MAX_PIXELS) -> ImageFacts:
    """Reads ``path`` once: hashes its bytes, checks the header, then decodes the whole image with Pillow,
    which (unlike OpenCV) raises on truncated or corrupt data. BadInput says why it cannot be segmented."""
    from PIL import Image, UnidentifiedImageError

    too_large = f"split or downscale it (limit: {max_pixels} pixels, --max-pixels)"
    suffix = path.suffix.lstrip(".").upper()
    kind = {"JPG": "JPEG", "TIF": "TIFF"}.get(suffix, suffix) or "image"  # Pillow's format names
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            mode, (width, height), kind = image.mode, image.size, image.format or kind
            if width * height > max_pixels:
                raise BadInput(f"{width}x{height} pixels; {too_large}")
            if mode not in ("RGB", "RGBA"):
                raise BadInput(f"{mode} image; convert it to 8-bit RGB")
            if _png_bit_depth(data) == 16:  # Pillow reports 16-bit RGB PNGs as mode RGB
                raise BadInput("16-bit PNG; convert it to 8-bit RGB")
            orientation = int(image.getexif().get(EXIF_ORIENTATION, 1))
            image.load()
        if kind == "PNG":  # checks every chunk's CRC, which decoding skips for ancillary chunks
            with Image.open(io.BytesIO(data)) as image:
                image.verify()
    except Image.DecompressionBombError:  # a header claiming hundreds of megapixels
        raise BadInput(f"too large for Pillow's decompression-bomb limit; {too_large}") from None
    except UnidentifiedImageError:
        raise BadInput(f"not an image (supported: {', '.join(IMAGE_SUFFIXES)})") from None
    except FileNotFoundError:
        raise BadInput("cannot be read: missing (a broken link?)") from None
    except PermissionError:
        raise BadInput("cannot be read: permission denied") from None
    except BadInput:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # Pillow's ways of saying "corrupt"
        raise BadInput(f"truncated or corrupt {kind} ({exc})") from None
    return ImageFacts(kind, width, height, orientation, len(data), hashlib.sha256(data).hexdigest())


def _png_bit_depth(data: bytes) -> int | None:
    # PNG layout: 8-byte signature, IHDR chunk (length, type, width, height), then the bit depth byte.
    return data[24] if data.startswith(PNG_SIGNATURE) and len(data) >= 25 else None


def read_upright_rgb(path: Path, exif_orientation: int) -> np.ndarray:
    """The image's RGB pixels as it is shown (EXIF orientation applied, alpha dropped)."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        upright = ImageOps.exif_transpose(image) if exif_orientation != 1 else image
        return np.asarray(upright.convert("RGB"))
