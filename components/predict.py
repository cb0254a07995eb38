"""Downstream inference with the exported ONNX model: images in, Cityscapes masks out.

    python -m components.predict --model models:/cityscapes-deeplabv3@champion \\
        --input <dir|glob|s3://bucket/prefix> --output <dir>

``--model`` is a registered model (``models:/name@alias`` or ``models:/name/version``; its ONNX file is
cached per version under ``~/.cache/cityseg-ops/<name>/<version>/``, ``--cache-dir`` or
``$CITYSEG_CACHE`` move it) or a local/s3:// ``.onnx`` file. For every image it writes
``trainIds/<rel>.png`` (trainIds), ``labelIds/<rel>.png`` (labelIds: what the Cityscapes benchmark
server and ``CITYSCAPES_RESULTS`` take) and ``overlay/<rel>.png`` (the colour mask blended on the image).

Inputs must be 8-bit RGB (RGBA loses its alpha); grayscale, palette and 16-bit images are refused,
naming the file, before anything is written. Images whose longer side exceeds ``--max-side`` are
tiled (overlapping windows, logits averaged) or, with ``--large resize``, downscaled; images of more than
``--max-pixels`` (default 40 MP) are refused.

This module is also the ``python_function`` loader of registered models (``_load_pyfunc``).
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from components import storage
from components.cli import run_cli
from components.data.layout import PNG_SIGNATURE
from components.errors import MLFLOW_NOT_FOUND_CODES, DataError, ModelError
from components.labels import colorize, trainid_to_labelid_lut

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_CACHE = Path.home() / ".cache" / "cityseg-ops"
_ONNX_IN_MODEL = "onnx/model.onnx"  # components.registry.ONNX_SUBPATH (not imported: keeps serving light)
MAX_PIXELS = 40_000_000
"""Largest input accepted (about 8K x 5K, 20 Cityscapes frames): tiling sums one float32 logit per class
and pixel, so memory grows with the image; larger ones are refused before anything is decoded."""


class Segmenter:
    """An onnxruntime session plus the normalisation its metadata prescribes."""

    def __init__(self, onnx_path: str | Path, providers: list[str] | None = None) -> None:
        available = ort.get_available_providers()
        providers = providers or [
            p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available
        ]
        try:
            self.session = ort.InferenceSession(str(onnx_path), providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors for unreadable models
            raise ModelError(f"cannot load ONNX model {onnx_path}: {exc}") from None
        meta = {k: json.loads(v) for k, v in self.session.get_modelmeta().custom_metadata_map.items()}
        if "mean" not in meta or "std" not in meta:
            raise ModelError(f"{onnx_path} lacks the mean/std metadata; export it with components.export")
        self.metadata = meta
        self.mean = np.asarray(meta["mean"], dtype=np.float32).reshape(1, 3, 1, 1) * 255
        self.std = np.asarray(meta["std"], dtype=np.float32).reshape(1, 3, 1, 1) * 255
        self.input_name = self.session.get_inputs()[0].name

    def logits(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB N x H x W x 3 -> float32 logits N x C x H x W."""
        batch = (images.transpose(0, 3, 1, 2).astype(np.float32) - self.mean) / self.std
        return self.session.run(None, {self.input_name: batch})[0]

    def masks(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB N x H x W x 3 -> uint8 trainIds N x H x W."""
        return self.logits(images).argmax(1).astype(np.uint8)


class _PyfuncSegmenter:
    """What ``mlflow.pyfunc.load_model`` returns for a registered version: predict(images) -> masks."""

    def __init__(self, onnx_path: str) -> None:
        self.segmenter = Segmenter(onnx_path)

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        images = np.asarray(model_input)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise DataError(f"expected uint8 RGB images N x H x W x 3, got shape {images.shape}")
        return self.segmenter.masks(images.astype(np.uint8))


def _load_pyfunc(data_path: str) -> _PyfuncSegmenter:
    """MLflow pyfunc loader hook (``loader_module: components.predict``)."""
    return _PyfuncSegmenter(data_path)


@dataclass
class InputImage:
    path: Path
    relative: Path
    """Output name relative to the output folders (keeps the input's sub-folders, e.g. cities)."""


def predict(
    model_uri: str,
    inputs: str,
    output_dir: str,
    *,
    batch_size: int = 4,
    max_side: int = 2048,
    large: str = "tile",
    max_pixels: int = MAX_PIXELS,
    cache_dir: str | None = None,
    providers: list[str] | None = None,
    progress: bool = True,
) -> list[Path]:
    """Segment every image under ``inputs``; returns the trainId PNG paths written (one per image)."""
    if large not in ("tile", "resize"):
        raise ValueError(f"large must be 'tile' or 'resize', got {large!r}")
    onnx_path = resolve_onnx(model_uri, cache_dir)
    segmenter = Segmenter(onnx_path, providers)
    with tempfile.TemporaryDirectory(prefix="cityseg-predict-") as scratch:
        images = collect_inputs(inputs, Path(scratch))
        validate_images([image.path for image in images], max_pixels)
        out = Path(output_dir)
        written = []
        with tqdm(total=len(images), desc="predict", unit="img", disable=not progress) as bar:
            for batch in _batches(images, batch_size, max_side):
                pixels = [_read_rgb(image.path) for image in batch]
                for image, rgb, mask in zip(
                    batch, pixels, _segment(segmenter, pixels, max_side, large), strict=True
                ):
                    written.append(_write_outputs(out, image.relative, rgb, mask))
                bar.update(len(batch))
    logger.info("wrote predictions for %d images to %s", len(written), output_dir)
    return written


def resolve_onnx(model_uri: str, cache_dir: str | None = None) -> Path:
    """A local ONNX file for a ``models:/`` URI (cached per version), an s3:// URI or a local path."""
    if model_uri.startswith("models:/"):
        return _registered_onnx(
            model_uri, Path(cache_dir or os.environ.get("CITYSEG_CACHE") or DEFAULT_CACHE)
        )
    if storage.is_s3(model_uri):
        local = Path(cache_dir or DEFAULT_CACHE) / "s3" / model_uri[len("s3://") :]
        return local if local.is_file() else storage.copy_to_local(model_uri, local)
    path = Path(model_uri)
    if not path.is_file():
        raise ModelError(f"model {model_uri} is neither a models:/ URI nor an existing .onnx file")
    return path


def _registered_onnx(model_uri: str, cache_root: Path) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    name, version = registered_version(client, model_uri)
    try:
        cached = cache_root / name / version / "model.onnx"
        if cached.is_file():
            return cached
        source = client.get_model_version_download_uri(name, version).rstrip("/")
        with tempfile.TemporaryDirectory(prefix="cityseg-download-") as tmp:
            downloaded = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{source}/{_ONNX_IN_MODEL}", dst_path=tmp
            )
            storage.copy_to_local(downloaded, cached)
    except MlflowException as exc:
        raise ModelError(
            f"cannot get the ONNX file of {model_uri} from {mlflow.get_tracking_uri()}: {exc.message}. "
            "Check the name/alias/version and MLFLOW_TRACKING_URI."
        ) from None
    logger.info("%s is %s version %s (cached at %s)", model_uri, name, version, cached)
    return cached


def registered_version(client: Any, model_uri: str) -> tuple[str, str]:
    """(name, version) of a ``models:/name@alias`` or ``models:/name/version`` URI. An unknown alias or
    model is a ModelError that lists what the registry does have."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    try:
        resolved = get_model_name_and_version(client, model_uri)
    except MlflowException as exc:
        raise ModelError(
            f"cannot resolve {model_uri} in the MLflow registry at {mlflow.get_tracking_uri()}: "
            f"{exc.message.rstrip('.')}. {_registry_hint(client, model_uri, exc.error_code)}"
        ) from None
    if len(resolved) != 2:  # models:/m-<id> names a logged model, not a registered version
        raise ModelError(f"{model_uri} is not a registered version: use models:/name@alias or name/version")
    name, version = resolved
    return name, str(version)


def _registry_hint(client: Any, model_uri: str, error_code: str) -> str:
    """What the registry has for the URI's model name (its aliases, else the model names), asked only when
    it answered "no such thing": an unreachable registry is not asked again."""
    from mlflow.exceptions import MlflowException

    unreachable = "Check MLFLOW_TRACKING_URI and that the server is up."
    if error_code not in MLFLOW_NOT_FOUND_CODES:
        return unreachable
    name = model_uri[len("models:/") :].split("@", 1)[0].split("/", 1)[0]
    try:
        models = {model.name: model.aliases for model in client.search_registered_models()}
    except MlflowException:
        return unreachable
    if name not in models:
        return f"Registered models: {', '.join(sorted(models)) or 'none'}."
    listed = ", ".join(f"@{alias} (version {version})" for alias, version in sorted(models[name].items()))
    return f"Aliases of {name}: {listed or 'none'}; or use models:/{name}/<version>."


def collect_inputs(inputs: str, scratch: Path) -> list[InputImage]:
    """The files to segment: a folder (recursively), a glob pattern or an s3:// prefix (downloaded)."""
    if storage.is_s3(inputs):
        return _download_prefix(inputs, scratch)
    root = Path(inputs)
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
        found = [InputImage(p, p.relative_to(root).with_suffix(".png")) for p in files]
    elif root.is_file():
        found = [InputImage(root, Path(root.stem + ".png"))]
    else:
        found = [InputImage(Path(p), Path(Path(p).stem + ".png")) for p in sorted(glob.glob(inputs))]
    if not found:
        raise DataError(f"no input files at {inputs}: pass a folder, a glob pattern or an s3:// prefix")
    return found


def _download_prefix(uri: str, scratch: Path) -> list[InputImage]:
    bucket, prefix = storage.split_s3(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    pages = storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    keys = sorted(
        obj["Key"] for page in pages for obj in page.get("Contents", []) if not obj["Key"].endswith("/")
    )
    if not keys:
        raise DataError(f"no objects under {uri}")
    found = []
    for key in keys:
        relative = Path(key[len(prefix) :])
        local = storage.copy_to_local(f"s3://{bucket}/{key}", scratch / relative)
        found.append(InputImage(local, relative.with_suffix(".png")))
    return found


def validate_images(paths: list[Path], max_pixels: int = MAX_PIXELS) -> None:
    """Refuse (naming every bad file) anything that is not an 8-bit RGB/RGBA image of at most
    ``max_pixels`` pixels; reads headers only."""
    from PIL import Image, UnidentifiedImageError

    problems = []
    too_large = f"split or downscale it (limit: {max_pixels} pixels, --max-pixels)"
    for path in paths:
        try:
            with Image.open(path) as image:
                mode, (width, height) = image.mode, image.size
        except Image.DecompressionBombError:  # a header claiming hundreds of megapixels
            problems.append(f"{path}: too large for Pillow's decompression-bomb limit; {too_large}")
            continue
        except (UnidentifiedImageError, OSError):
            problems.append(f"{path}: not an image (supported: {', '.join(IMAGE_SUFFIXES)})")
            continue
        if width * height > max_pixels:
            problems.append(f"{path}: {width}x{height} pixels; {too_large}")
        elif mode not in ("RGB", "RGBA"):
            problems.append(f"{path}: {mode} image; convert it to 8-bit RGB")
        elif _png_bit_depth(path) == 16:  # Pillow reports 16-bit RGB PNGs as mode RGB
            problems.append(f"{path}: 16-bit PNG; convert it to 8-bit RGB")
    if problems:
        raise DataError(f"{len(problems)} input file(s) cannot be segmented:\n  " + "\n  ".join(problems))


def _png_bit_depth(path: Path) -> int | None:
    with path.open("rb") as handle:
        header = handle.read(25)
    # PNG layout: 8-byte signature, IHDR chunk (length, type, width, height), then the bit depth byte.
    return header[24] if header.startswith(PNG_SIGNATURE) and len(header) == 25 else None


def _read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)  # drops alpha
    if bgr is None:
        raise DataError(f"{path}: OpenCV cannot decode it")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _batches(images: list[InputImage], batch_size: int, max_side: int) -> Iterator[list[InputImage]]:
    """Consecutive images of one size share a batch; a large image goes alone (its tiles are batched)."""
    from PIL import Image

    batch: list[InputImage] = []
    size: tuple[int, int] | None = None
    for image in images:
        with Image.open(image.path) as opened:
            this = opened.size
        if batch and (this != size or len(batch) == batch_size or max(this) > max_side):
            yield batch
            batch = []
        batch.append(image)
        size = this
    if batch:
        yield batch


def _segment(segmenter: Segmenter, pixels: list[np.ndarray], max_side: int, large: str) -> list[np.ndarray]:
    height, width = pixels[0].shape[:2]
    if max(height, width) <= max_side:
        return list(segmenter.masks(np.stack(pixels)))
    (rgb,) = pixels
    if large == "resize":
        scale = max_side / max(height, width)
        small = cv2.resize(rgb, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
        mask = segmenter.masks(small[None])[0]
        return [cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)]
    return [_tiled_mask(segmenter, rgb, max_side)]


def _tiled_mask(segmenter: Segmenter, rgb: np.ndarray, tile: int, batch_size: int = 4) -> np.ndarray:
    """Overlapping tile x tile windows (a third overlap); logits summed per pixel, then argmax."""
    height, width = rgb.shape[:2]
    windows = [(y, x) for y in _starts(height, tile) for x in _starts(width, tile)]
    th, tw = min(tile, height), min(tile, width)
    total: np.ndarray | None = None
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        logits = segmenter.logits(np.stack([rgb[y : y + th, x : x + tw] for y, x in chunk]))
        if total is None:
            total = np.zeros((logits.shape[1], height, width), dtype=np.float32)
        for (y, x), window in zip(chunk, logits, strict=True):
            total[:, y : y + th, x : x + tw] += window
    return total.argmax(0).astype(np.uint8)


def _starts(length: int, tile: int) -> list[int]:
    if length <= tile:
        return [0]
    stride = max(1, tile * 2 // 3)
    starts = list(range(0, length - tile, stride))
    return [*starts, length - tile]


def _write_outputs(out: Path, relative: Path, rgb: np.ndarray, mask: np.ndarray) -> Path:
    overlay = cv2.addWeighted(rgb, 0.5, colorize(mask), 0.5, 0)
    outputs = {
        "trainIds": mask,
        "labelIds": trainid_to_labelid_lut()[mask],
        "overlay": cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR),
    }
    for folder, array in outputs.items():
        ok, encoded = cv2.imencode(".png", array)
        if not ok:
            raise DataError(f"cannot encode the {folder} PNG for {relative}")
        storage.write_bytes(out / folder / relative, encoded.tobytes())
    return out / "trainIds" / relative


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Segment images with an exported/registered model.")
    parser.add_argument(
        "--model", required=True, help="models:/name@alias, models:/name/version or a .onnx path"
    )
    parser.add_argument("--input", required=True, help="a folder, a glob pattern or an s3:// prefix")
    parser.add_argument("--output", required=True, help="output folder (trainIds/, labelIds/, overlay/)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-side", type=int, default=2048, help="larger images are tiled or resized")
    parser.add_argument("--large", choices=("tile", "resize"), default="tile")
    parser.add_argument(
        "--max-pixels", type=int, default=MAX_PIXELS, help="larger images are refused (memory bound)"
    )
    parser.add_argument("--cache-dir", help=f"model cache (default $CITYSEG_CACHE or {DEFAULT_CACHE})")
    parser.add_argument("--cpu", action="store_true", help="use the CPU even when CUDA is available")
    args = parser.parse_args(argv)

    def run() -> None:
        written = predict(
            args.model,
            args.input,
            args.output,
            batch_size=args.batch_size,
            max_side=args.max_side,
            large=args.large,
            max_pixels=args.max_pixels,
            cache_dir=args.cache_dir,
            providers=["CPUExecutionProvider"] if args.cpu else None,
        )
        print(f"segmented {len(written)} images into {args.output}")

    return run_cli(run)


if __name__ == "__main__":
    raise SystemExit(main())
