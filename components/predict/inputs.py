"""What batch inference reads: listing the inputs (folder, glob, s3:// prefix), refusing colliding output
names, and checking every image fully before anything is written (corrupt, unsupported, too large)."""

from __future__ import annotations

import glob
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components import storage
from components.data.layout import PNG_SIGNATURE
from components.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


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


def materialise(ref: InputRef, scratch: Path) -> Path:
    if storage.is_s3(ref.source):
        return storage.copy_to_local(ref.source, scratch / ref.source[len("s3://") :])
    return Path(ref.source)


def find_problems(local: dict[str, Path], max_pixels: int = MAX_PIXELS) -> dict[str, str]:
    """input -> why it cannot be segmented, for every bad one of ``local`` (input -> local file)."""
    return {source: problem for source, path in local.items() if (problem := inspect_image(path, max_pixels))}


def check_inputs(refs: list[InputRef], max_pixels: int = MAX_PIXELS) -> dict[str, str]:
    """:func:`find_problems` for inputs anywhere (s3:// ones are fetched to a scratch folder)."""
    with tempfile.TemporaryDirectory(prefix="cityseg-check-") as scratch:
        return find_problems({ref.source: materialise(ref, Path(scratch)) for ref in refs}, max_pixels)


def refuse(problems: dict[str, str]) -> None:
    """The DataError naming every bad input (raised before anything is written)."""
    raise DataError(
        f"{len(problems)} input file(s) cannot be segmented (nothing was written; --skip-bad skips "
        "them and lists them in the manifest):\n  "
        + "\n  ".join(f"{source}: {problem}" for source, problem in problems.items())
    )


def inspect_image(path: Path, max_pixels: int = MAX_PIXELS) -> str | None:
    """Why ``path`` cannot be segmented (None if it can): checks the header, then decodes the whole
    image with Pillow, which (unlike OpenCV) raises on truncated or corrupt data."""
    from PIL import Image, UnidentifiedImageError

    too_large = f"split or downscale it (limit: {max_pixels} pixels, --max-pixels)"
    suffix = path.suffix.lstrip(".").upper()
    kind = {"JPG": "JPEG", "TIF": "TIFF"}.get(suffix, suffix) or "image"  # Pillow's format names
    try:
        with Image.open(path) as image:
            mode, (width, height), kind = image.mode, image.size, image.format or kind
            if width * height > max_pixels:
                return f"{width}x{height} pixels; {too_large}"
            if mode not in ("RGB", "RGBA"):
                return f"{mode} image; convert it to 8-bit RGB"
            if _png_bit_depth(path) == 16:  # Pillow reports 16-bit RGB PNGs as mode RGB
                return "16-bit PNG; convert it to 8-bit RGB"
            image.load()
        if kind == "PNG":  # checks every chunk's CRC, which decoding skips for ancillary chunks
            with Image.open(path) as image:
                image.verify()
    except Image.DecompressionBombError:  # a header claiming hundreds of megapixels
        return f"too large for Pillow's decompression-bomb limit; {too_large}"
    except UnidentifiedImageError:
        return f"not an image (supported: {', '.join(IMAGE_SUFFIXES)})"
    except FileNotFoundError:
        return "cannot be read: missing (a broken link?)"
    except PermissionError:
        return "cannot be read: permission denied"
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # Pillow's ways of saying "corrupt"
        return f"truncated or corrupt {kind} ({exc})"
    return None


def _png_bit_depth(path: Path) -> int | None:
    with path.open("rb") as handle:
        header = handle.read(25)
    # PNG layout: 8-byte signature, IHDR chunk (length, type, width, height), then the bit depth byte.
    return header[24] if header.startswith(PNG_SIGNATURE) and len(header) == 25 else None


def read_rgb(path: Path) -> tuple[np.ndarray, int]:
    """Upright RGB pixels (EXIF orientation applied, alpha dropped) and the EXIF orientation (1 = none)."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        orientation = int(image.getexif().get(0x0112, 1))  # 0x0112: the EXIF Orientation tag
        upright = ImageOps.exif_transpose(image) if orientation != 1 else image
        return np.asarray(upright.convert("RGB")), orientation
