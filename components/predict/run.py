"""Segmenting a batch: fetch and check every input once, batch by size, tile or resize large images, write
trainIds/labelIds/overlay PNGs, and append every finished batch's records to the manifest."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from components import storage
from components.errors import DataError
from components.labels import colorize, trainid_to_labelid_lut
from components.predict.inputs import (
    MAX_PIXELS,
    ImageFacts,
    InputRef,
    check_collisions,
    examine_inputs,
    fetch_inputs,
    list_inputs,
    read_upright_rgb,
    refuse,
)
from components.predict.manifest import (
    FAILED,
    MANIFEST,
    OK,
    ManifestWriter,
    ModelId,
    is_done,
    merge_manifests,
    model_fields,
    read_manifest,
)
from components.predict.model_file import resolve_model
from components.serving import Segmenter

logger = logging.getLogger(__name__)


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


OnBatch = Callable[[int, int], None]
"""Called after each batch's records are written with (inputs done, inputs in all): progress reporting."""


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
    shard: int = 0,
    merge: bool = True,
    cache_dir: str | None = None,
    device: str = "auto",
    precision: str = "fp32",
    progress: bool = True,
    on_batch: OnBatch | None = None,
) -> PredictSummary:
    """Segment ``inputs`` (a folder, glob or s3:// prefix, or listed InputRefs) into ``output`` (a folder
    or s3:// prefix); see ``components.predict``.

    Each finished batch is appended to shard ``shard``'s records (:class:`ManifestWriter`), and inputs
    those records or ``manifest.jsonl`` list as done with this model are skipped, so an interrupted run
    resumes. ``merge`` (a whole run in this process) also folds every record into ``manifest.jsonl``
    before and after; one shard of a flow run (``merge=False``) leaves that to the flow, which also left
    out what ``manifest.jsonl`` lists as done, so the shard reads only its own records."""
    if large not in ("tile", "resize"):
        raise ValueError(f"large must be 'tile' or 'resize', got {large!r}")
    refs = list_inputs(inputs) if isinstance(inputs, str) else inputs
    check_collisions(refs)
    onnx_path, model = resolve_model(model_uri, cache_dir, precision)
    segmenter = Segmenter(onnx_path, device)
    # A whole run folds in what an interrupted sharded run left; one shard of a flow run reads only its own
    # records (its flow already left out what manifest.jsonl lists as done).
    records = merge_manifests(output) if merge else read_manifest(output, shards=[shard], merged=False)
    todo = [ref for ref in refs if not is_done(records.get(ref.source), model)]
    summary = PredictSummary(model, output, storage.join(output, MANIFEST), provider=segmenter.provider)
    summary.resumed = len(refs) - len(todo)
    if summary.resumed:
        logger.info("%d of %d inputs already done with %s v%s: skipped", summary.resumed, len(refs),
                    model.name, model.version)  # fmt: skip
    writer = ManifestWriter(output, shard)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cityseg-predict-") as scratch:
        local = fetch_inputs(todo, Path(scratch))
        facts, problems = examine_inputs(local, max_pixels)
        if problems and not skip_bad:
            refuse(problems)
        for source, problem in problems.items():
            logger.warning("skipping %s: %s", source, problem)
        summary.failed.update(problems)
        if problems:
            writer.append([_failed_record(source, problem, model) for source, problem in problems.items()])
        finished = summary.resumed + len(problems)
        good = [ref for ref in todo if ref.source in facts]
        with tqdm(total=len(good), desc="predict", unit="img", disable=not progress) as bar:
            for batch in _batches(good, facts, batch_size, max_side):
                pixels = [
                    read_upright_rgb(local[ref.source], facts[ref.source].exif_orientation) for ref in batch
                ]
                masks = _segment(segmenter, pixels, max_side, large)
                batch_records = []
                for ref, rgb, mask in zip(batch, pixels, masks, strict=True):
                    outputs = _write_outputs(output, ref.relative, rgb, mask, overlays)
                    batch_records.append(
                        _done_record(ref, facts[ref.source], outputs, mask, segmenter, model)
                    )
                    summary.segmented.append(outputs["trainIds"])
                writer.append(batch_records)  # an interrupted run resumes from here
                finished += len(batch)
                bar.update(len(batch))
                if on_batch:
                    on_batch(finished, len(refs))
    if merge:
        merge_manifests(output)
    summary.seconds = time.perf_counter() - started
    logger.info(
        "segmented %d images (%d done before, %d failed) into %s with %s v%s on %s",
        len(summary.segmented), summary.resumed, len(summary.failed), output, model.name, model.version,
        summary.provider,
    )  # fmt: skip
    return summary


def _done_record(
    ref: InputRef, facts: ImageFacts, outputs: dict[str, str], mask: np.ndarray, segmenter: Segmenter,
    model: ModelId,
) -> dict[str, Any]:  # fmt: skip
    return {
        "input": ref.source, "outputs": outputs, "status": OK,
        "width": int(mask.shape[1]), "height": int(mask.shape[0]), "exif_orientation": facts.exif_orientation,
        "input_format": facts.format, "input_bytes": facts.size_bytes, "input_sha256": facts.sha256,
        "provider": segmenter.provider, **model_fields(model),
    }  # fmt: skip


def _failed_record(source: str, problem: str, model: ModelId) -> dict[str, Any]:
    return {"input": source, "outputs": {}, "status": FAILED, "error": problem, **model_fields(model)}


def _batches(
    refs: list[InputRef], facts: dict[str, ImageFacts], batch_size: int, max_side: int
) -> Iterator[list[InputRef]]:
    """Consecutive images of one size share a batch; a large image goes alone (its tiles are batched)."""
    batch: list[InputRef] = []
    size: tuple[int, int] | None = None
    for ref in refs:
        this = facts[ref.source].upright_size
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
