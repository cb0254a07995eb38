"""Batch inference with the exported ONNX model: images in, Cityscapes masks plus a manifest out.

    python -m components.predict --model models:/cityscapes-deeplabv3@champion \\
        --input <dir|glob|s3://bucket/prefix> --output <dir|s3://bucket/prefix> [--skip-bad]

``--model`` is a registered model (``models:/name@alias`` or ``models:/name/version``; its ONNX file is
cached per version under ``~/.cache/cityseg-ops/<name>/<version>/``, ``--cache-dir`` or
``$CITYSEG_CACHE`` move it) or a local/s3:// ``.onnx`` file. For every image ``<rel>/<stem>.<ext>`` it
writes ``trainIds/<rel>/<stem>.png``, ``labelIds/<rel>/<stem>.png`` (what the Cityscapes benchmark
server and ``CITYSCAPES_RESULTS`` take) and, unless ``--no-overlay``, ``overlay/<rel>/<stem>.png``, plus
one line per input in ``manifest.jsonl`` (input, outputs, size, model name and version, the onnxruntime
execution provider that ran it, status).

``--device`` (default ``auto``) picks where onnxruntime runs: ``auto`` uses the GPU when one is visible
(and says why not when it falls back to the CPU), ``cuda`` refuses to start without a working CUDA provider
(DeviceError, listing what is missing), ``cpu`` (or ``--cpu``) never touches the GPU.

Nothing is lost or silently wrong:
  * two inputs that would write the same output (``x.jpg`` and ``x.webp``) are refused before anything
    is written, naming both;
  * every image is fully decoded with Pillow before anything is written: a truncated or corrupt file
    (which OpenCV would decode half-way and fill in) is refused, naming it; ``--skip-bad`` instead skips
    such files and lists them in the manifest with ``status: failed`` and the reason;
  * inputs must be 8-bit RGB (RGBA loses its alpha); grayscale, palette, CMYK and 16-bit images are
    refused the same way; images of more than ``--max-pixels`` (default 40 MP) too;
  * EXIF orientation **is applied** (the network was trained on upright scenes, and the mask then lines
    up with the image as every viewer shows it); the manifest records the orientation and the size of
    the mask;
  * a rerun into the same output skips inputs the manifest lists as done with the same model version:
    an interrupted batch resumes.
Images whose longer side exceeds ``--max-side`` are tiled (overlapping windows, logits averaged) or,
with ``--large resize``, downscaled.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from components import storage
from components.cli import run_cli
from components.data.layout import PNG_SIGNATURE
from components.errors import DataError, ModelError
from components.labels import colorize, trainid_to_labelid_lut
from components.serving import DEVICES, PRECISIONS, Segmenter, variant_path

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_CACHE = Path.home() / ".cache" / "cityseg-ops"
_ONNX_IN_MODEL = "onnx/model.onnx"  # components.registry.ONNX_SUBPATH
MAX_PIXELS = 40_000_000
"""Largest input accepted (about 8K x 5K, 20 Cityscapes frames): tiling sums one float32 logit per class
and pixel, so memory grows with the image; larger ones are refused before anything is decoded."""
MANIFEST = "manifest.jsonl"
OK, FAILED = "ok", "failed"


@dataclass(frozen=True)
class InputRef:
    source: str
    """The input as the user named it (a local path or an s3:// URI): the manifest's key."""
    relative: str
    """Output name relative to the output folders (keeps the input's sub-folders, e.g. cities)."""


@dataclass
class ModelId:
    name: str
    version: str
    """Registry version, or the first 12 hex digits of the file's sha256 for a plain ONNX file."""
    precision: str = "fp32"
    """Which ONNX variant ran (``--precision``): fp32, or the int8 file exported beside it."""


@dataclass
class PredictSummary:
    model: ModelId
    output: str
    manifest: str
    segmented: list[str] = field(default_factory=list)
    """The trainId PNGs written by this call."""
    resumed: int = 0
    """Inputs skipped because the manifest lists them as done with this model version."""
    failed: dict[str, str] = field(default_factory=dict)
    """input -> reason, for inputs skipped with skip_bad."""
    seconds: float = 0.0
    provider: str = ""
    """The onnxruntime execution provider that ran the model (CUDAExecutionProvider, CPUExecutionProvider)."""

    @property
    def images_per_second(self) -> float:
        return len(self.segmented) / self.seconds if self.seconds else 0.0


def predict(model_uri: str, inputs: str, output_dir: str, **options: Any) -> list[Path]:
    """Segment every image under ``inputs`` into ``output_dir`` (local); returns the trainId PNGs written.
    See :func:`segment_inputs` for the options."""
    return [Path(path) for path in segment_inputs(model_uri, inputs, output_dir, **options).segmented]


def segment_inputs(
    model_uri: str,
    inputs: str | list[InputRef],
    output: str,
    *,
    batch_size: int = 4,
    max_side: int = 2048,
    large: str = "tile",
    max_pixels: int = MAX_PIXELS,
    skip_bad: bool = False,
    overlays: bool = True,
    manifest_name: str = MANIFEST,
    cache_dir: str | None = None,
    device: str = "auto",
    precision: str = "fp32",
    progress: bool = True,
) -> PredictSummary:
    """Segment ``inputs`` (a folder, glob or s3:// prefix, or listed InputRefs) into ``output`` (a folder
    or s3:// prefix) and record every input in ``<output>/<manifest_name>``; see the module docstring."""
    if large not in ("tile", "resize"):
        raise ValueError(f"large must be 'tile' or 'resize', got {large!r}")
    refs = list_inputs(inputs) if isinstance(inputs, str) else inputs
    check_collisions(refs)
    onnx_path, model = resolve_model(model_uri, cache_dir, precision)
    segmenter = Segmenter(onnx_path, device)
    manifest = read_manifest(output)
    records = {source: record for source, record in manifest.items() if source in {r.source for r in refs}}
    todo = [ref for ref in refs if not _done(records.get(ref.source), model)]
    summary = PredictSummary(model, output, storage.join(output, manifest_name), provider=segmenter.provider)
    summary.resumed = len(refs) - len(todo)
    if summary.resumed:
        logger.info("%d of %d inputs already done with %s v%s: skipped", summary.resumed, len(refs),
                    model.name, model.version)  # fmt: skip
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cityseg-predict-") as scratch:
        local = {ref.source: _materialise(ref, Path(scratch)) for ref in todo}
        problems = find_problems(local, max_pixels)
        if problems and not skip_bad:
            refuse(problems)
        for source, problem in problems.items():
            logger.warning("skipping %s: %s", source, problem)
            records[source] = {
                "input": source,
                "outputs": {},
                "status": FAILED,
                "error": problem,
                **_model_fields(model),
            }
            summary.failed[source] = problem
        good = [ref for ref in todo if ref.source not in problems]
        with tqdm(total=len(good), desc="predict", unit="img", disable=not progress) as bar:
            for batch in _batches(good, local, batch_size, max_side):
                decoded = [_read_rgb(local[ref.source]) for ref in batch]
                pixels = [rgb for rgb, _ in decoded]
                masks = _segment(segmenter, pixels, max_side, large)
                for ref, (rgb, orientation), mask in zip(batch, decoded, masks, strict=True):
                    outputs = _write_outputs(output, ref.relative, rgb, mask, overlays)
                    records[ref.source] = {
                        "input": ref.source, "outputs": outputs, "status": OK,
                        "width": int(mask.shape[1]), "height": int(mask.shape[0]),
                        "exif_orientation": orientation, "provider": segmenter.provider,
                        **_model_fields(model),
                    }  # fmt: skip
                    summary.segmented.append(outputs["trainIds"])
                # Recorded after every batch: an interrupted run resumes from here.
                write_manifest(summary.manifest, records)
                bar.update(len(batch))
    write_manifest(summary.manifest, records)
    summary.seconds = time.perf_counter() - started
    logger.info(
        "segmented %d images (%d done before, %d failed) into %s with %s v%s on %s",
        len(summary.segmented), summary.resumed, len(summary.failed), output, model.name, model.version,
        summary.provider,
    )  # fmt: skip
    return summary


def find_problems(local: dict[str, Path], max_pixels: int = MAX_PIXELS) -> dict[str, str]:
    """input -> why it cannot be segmented, for every bad one of ``local`` (input -> local file)."""
    return {source: problem for source, path in local.items() if (problem := inspect_image(path, max_pixels))}


def check_inputs(refs: list[InputRef], max_pixels: int = MAX_PIXELS) -> dict[str, str]:
    """:func:`find_problems` for inputs anywhere (s3:// ones are fetched to a scratch folder)."""
    with tempfile.TemporaryDirectory(prefix="cityseg-check-") as scratch:
        return find_problems({ref.source: _materialise(ref, Path(scratch)) for ref in refs}, max_pixels)


def refuse(problems: dict[str, str]) -> None:
    """The DataError naming every bad input (raised before anything is written)."""
    raise DataError(
        f"{len(problems)} input file(s) cannot be segmented (nothing was written; --skip-bad skips "
        "them and lists them in the manifest):\n  "
        + "\n  ".join(f"{source}: {problem}" for source, problem in problems.items())
    )


def _model_fields(model: ModelId) -> dict[str, str]:
    return {"model_name": model.name, "model_version": model.version, "model_precision": model.precision}


def _done(record: dict[str, Any] | None, model: ModelId) -> bool:
    if not record or record["status"] != OK:
        return False
    recorded = {key: record.get(key) for key in ("model_name", "model_version", "model_precision")}
    recorded["model_precision"] = recorded["model_precision"] or "fp32"  # manifests from before --precision
    return recorded == _model_fields(model)


def read_manifest(output: str) -> dict[str, dict[str, Any]]:
    """input -> record, from ``manifest.jsonl`` and any per-shard ``manifest.*.jsonl`` under ``output``
    (a later line for the same input wins)."""
    names = [n for n in storage.list_names(output) if n.startswith("manifest") and n.endswith(".jsonl")]
    names.sort(key=lambda n: (n != MANIFEST, n))
    records: dict[str, dict[str, Any]] = {}
    for name in names:
        for line in storage.read_bytes(storage.join(output, name)).decode().splitlines():
            if line.strip():
                record = json.loads(line)
                records[record["input"]] = record
    return records


def write_manifest(uri: str, records: dict[str, dict[str, Any]]) -> None:
    """One JSON line per input, sorted by input; written whole (atomically for local files)."""
    text = "".join(json.dumps(records[key], sort_keys=True) + "\n" for key in sorted(records))
    storage.write_bytes(uri, text.encode())


def resolve_model(
    model_uri: str, cache_dir: str | None = None, precision: str = "fp32"
) -> tuple[Path, ModelId]:
    """A local ONNX file and the name/version/precision the manifest records for it."""
    path = resolve_onnx(model_uri, cache_dir, precision)
    if model_uri.startswith("models:/"):
        return path, ModelId(path.parent.parent.name, path.parent.name, precision)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return path, ModelId(model_uri, digest, precision)


def resolve_onnx(model_uri: str, cache_dir: str | None = None, precision: str = "fp32") -> Path:
    """A local ONNX file for a ``models:/`` URI (cached per version), an s3:// URI or a local path;
    ``precision`` int8 takes the variant the export stage wrote beside it (``export.int8``)."""
    if model_uri.startswith("models:/"):
        return _registered_onnx(
            model_uri, Path(cache_dir or os.environ.get("CITYSEG_CACHE") or DEFAULT_CACHE), precision
        )
    model_uri = variant_path(model_uri, precision)
    if storage.is_s3(model_uri):
        local = Path(cache_dir or DEFAULT_CACHE) / "s3" / model_uri[len("s3://") :]
        return local if local.is_file() else storage.copy_to_local(model_uri, local)
    path = Path(model_uri)
    if not path.is_file():
        raise ModelError(
            f"model {model_uri} is neither a models:/ URI nor an existing .onnx file"
            + _variant_hint(precision)
        )
    return path


def _registered_onnx(model_uri: str, cache_root: Path, precision: str) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    from components.registry import download_through_the_server, registered_version

    client = mlflow.MlflowClient()
    name, version = registered_version(client, model_uri)
    download_through_the_server()
    in_model = variant_path(_ONNX_IN_MODEL, precision)
    try:
        cached = cache_root / name / version / Path(in_model).name
        if cached.is_file():
            return cached
        source = client.get_model_version_download_uri(name, version).rstrip("/")
        with tempfile.TemporaryDirectory(prefix="cityseg-download-") as tmp:
            downloaded = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{source}/{in_model}", dst_path=tmp
            )
            storage.copy_to_local(downloaded, cached)
    except MlflowException as exc:
        raise ModelError(
            f"cannot get the {precision} ONNX file of {model_uri} from {mlflow.get_tracking_uri()}: "
            f"{exc.message}. Check the name/alias/version and MLFLOW_TRACKING_URI{_variant_hint(precision)}."
        ) from None
    logger.info("%s is %s version %s (cached at %s)", model_uri, name, version, cached)
    return cached


def _variant_hint(precision: str) -> str:
    if precision == "fp32":
        return ""
    return f" (the {precision} variant exists only where the export stage ran with export.{precision}=true)"


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


def _materialise(ref: InputRef, scratch: Path) -> Path:
    if storage.is_s3(ref.source):
        return storage.copy_to_local(ref.source, scratch / ref.source[len("s3://") :])
    return Path(ref.source)


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


def _read_rgb(path: Path) -> tuple[np.ndarray, int]:
    """Upright RGB pixels (EXIF orientation applied, alpha dropped) and the EXIF orientation (1 = none)."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        orientation = int(image.getexif().get(0x0112, 1))  # 0x0112: the EXIF Orientation tag
        upright = ImageOps.exif_transpose(image) if orientation != 1 else image
        return np.asarray(upright.convert("RGB")), orientation


def _batches(
    refs: list[InputRef], local: dict[str, Path], batch_size: int, max_side: int
) -> Iterator[list[InputRef]]:
    """Consecutive images of one size share a batch; a large image goes alone (its tiles are batched)."""
    from PIL import Image

    batch: list[InputRef] = []
    size: tuple[int, int] | None = None
    for ref in refs:
        with Image.open(local[ref.source]) as opened:
            this = opened.size
            if int(opened.getexif().get(0x0112, 1)) in (5, 6, 7, 8):  # rotated by 90 degrees when read
                this = this[::-1]
        if batch and (this != size or len(batch) == batch_size or max(this) > max_side):
            yield batch
            batch = []
        batch.append(ref)
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


def _write_outputs(
    output: str, relative: str, rgb: np.ndarray, mask: np.ndarray, overlays: bool
) -> dict[str, str]:
    arrays = {"trainIds": mask, "labelIds": trainid_to_labelid_lut()[mask]}
    if overlays:
        overlay = cv2.addWeighted(rgb, 0.5, colorize(mask), 0.5, 0)
        arrays["overlay"] = cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR)
    written = {}
    for folder, array in arrays.items():
        ok, encoded = cv2.imencode(".png", array)
        if not ok:
            raise DataError(f"cannot encode the {folder} PNG for {relative}")
        written[folder] = storage.join(output, folder, relative)
        storage.write_bytes(written[folder], encoded.tobytes())
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Segment images with an exported/registered model.")
    parser.add_argument(
        "--model", required=True, help="models:/name@alias, models:/name/version or a .onnx path"
    )
    parser.add_argument("--input", required=True, help="a folder, a glob pattern or an s3:// prefix")
    parser.add_argument(
        "--output",
        required=True,
        help="folder or s3:// prefix (trainIds/, labelIds/, overlay/, manifest.jsonl)",
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-side", type=int, default=2048, help="larger images are tiled or resized")
    parser.add_argument("--large", choices=("tile", "resize"), default="tile")
    parser.add_argument(
        "--max-pixels", type=int, default=MAX_PIXELS, help="larger images are refused (memory bound)"
    )
    parser.add_argument(
        "--skip-bad", action="store_true",
        help="skip corrupt/unsupported images (listed in the manifest) instead of refusing the whole run",
    )  # fmt: skip
    parser.add_argument("--no-overlay", action="store_true", help="write masks only")
    parser.add_argument("--cache-dir", help=f"model cache (default $CITYSEG_CACHE or {DEFAULT_CACHE})")
    parser.add_argument(
        "--device", choices=DEVICES, default="auto",
        help="auto: the GPU when one is visible, else the CPU; cuda: a GPU or an error; cpu",
    )  # fmt: skip
    parser.add_argument("--cpu", dest="device", action="store_const", const="cpu", help="--device cpu")
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="fp32",
        help="the ONNX variant: int8 runs ~2-3x faster on CPUs (exported with export.int8=true)",
    )  # fmt: skip
    args = parser.parse_args(argv)

    def run() -> None:
        summary = segment_inputs(
            args.model,
            args.input,
            args.output,
            batch_size=args.batch_size,
            max_side=args.max_side,
            large=args.large,
            max_pixels=args.max_pixels,
            skip_bad=args.skip_bad,
            overlays=not args.no_overlay,
            cache_dir=args.cache_dir,
            device=args.device,
            precision=args.precision,
        )
        print(
            f"segmented {len(summary.segmented)} images into {args.output} with {summary.model.name} "
            f"v{summary.model.version} on {summary.provider} ({summary.resumed} done before, "
            f"{len(summary.failed)} skipped as bad; manifest: {summary.manifest})"
        )

    return run_cli(run)


if __name__ == "__main__":
    raise SystemExit(main())
