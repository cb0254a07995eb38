"""Batch inference with the exported ONNX model: images in, Cityscapes masks plus a manifest out.

    python -m components.predict --model models:/cityscapes-deeplabv3@champion \\
        --input <dir|glob|s3://bucket/prefix> --output <dir|s3://bucket/prefix> [--skip-bad]

``--model`` is a registered model (``models:/name@alias`` or ``models:/name/version``; its ONNX file is
cached per version under ``~/.cache/cityseg-ops/<name>/<version>/``, ``--cache-dir`` or
``$CITYSEG_CACHE`` move it) or a local/s3:// ``.onnx`` file. For every image ``<rel>/<stem>.<ext>`` it
writes ``trainIds/<rel>/<stem>.png``, ``labelIds/<rel>/<stem>.png`` (what the Cityscapes benchmark
server and ``CITYSCAPES_RESULTS`` take) and, unless ``--no-overlay``, ``overlay/<rel>/<stem>.png``, plus
one line per input in ``manifest.jsonl`` (input, outputs, size, model name and version, the onnxruntime
execution provider that ran it, status, and what the check learned: format, EXIF orientation, byte size
and sha256 of the input).

``--device`` (default ``auto``) picks where onnxruntime runs: ``auto`` uses the GPU when one is visible
(and says why not when it falls back to the CPU), ``cuda`` refuses to start without a working CUDA provider
(DeviceError, listing what is missing), ``cpu`` (or ``--cpu``) never touches the GPU.

Nothing is lost or silently wrong:
  * two inputs that would write the same output (``x.jpg`` and ``x.webp``) are refused before anything
    is written, naming both;
  * every input is fetched once (an s3:// object into a scratch folder) and fully decoded with Pillow
    before anything is written: a truncated or corrupt file
    (which OpenCV would decode half-way and fill in) is refused, naming it; ``--skip-bad`` instead skips
    such files and lists them in the manifest with ``status: failed`` and the reason;
  * inputs must be 8-bit RGB (RGBA loses its alpha); grayscale, palette, CMYK and 16-bit images are
    refused the same way; images of more than ``--max-pixels`` (default 40 MP) too;
  * EXIF orientation **is applied** (the network was trained on upright scenes, and the mask then lines
    up with the image as every viewer shows it); the manifest records the orientation and the size of
    the mask;
  * every finished batch is appended to the records (an fsync'd local file, or one small S3 object per
    batch), which are merged into ``manifest.jsonl`` at the end; a rerun into the same output skips
    inputs they list as done with the same model version: an interrupted batch resumes.
Images whose longer side exceeds ``--max-side`` are tiled (overlapping windows, logits averaged) or,
with ``--large resize``, downscaled.

The package, one module per concern:
  * ``inputs``: listing and checking the inputs (:func:`list_inputs`, :func:`check_collisions`,
    :func:`examine_inputs`, :class:`ImageFacts`, :func:`refuse`);
  * ``manifest``: the append-only records of each shard and their merge into ``manifest.jsonl``
    (:class:`ManifestWriter`, :func:`read_manifest`, :func:`merge_manifests`);
  * ``model_file``: the ONNX file a model URI names (:func:`pin_model`, :func:`resolve_model`);
  * ``run``: segmenting a batch (:func:`segment_inputs`, :func:`predict`);
  * ``__main__``: the command line.
"""

from components.predict.inputs import (
    IMAGE_SUFFIXES,
    MAX_PIXELS,
    ImageFacts,
    InputRef,
    check_collisions,
    examine_inputs,
    image_facts,
    inspect_image,
    list_inputs,
    refuse,
)
from components.predict.manifest import (
    MANIFEST,
    ManifestWriter,
    ModelId,
    is_done,
    merge_manifests,
    read_manifest,
    shard_records_name,
    status_counts,
    write_manifest,
)
from components.predict.model_file import (
    DEFAULT_CACHE,
    available_precisions,
    pin_model,
    resolve_model,
    resolve_onnx,
)
from components.predict.run import PredictSummary, predict, segment_inputs

__all__ = [
    "DEFAULT_CACHE",
    "IMAGE_SUFFIXES",
    "MANIFEST",
    "MAX_PIXELS",
    "ImageFacts",
    "InputRef",
    "ManifestWriter",
    "ModelId",
    "PredictSummary",
    "available_precisions",
    "check_collisions",
    "examine_inputs",
    "image_facts",
    "inspect_image",
    "is_done",
    "list_inputs",
    "merge_manifests",
    "pin_model",
    "predict",
    "read_manifest",
    "refuse",
    "resolve_model",
    "resolve_onnx",
    "segment_inputs",
    "shard_records_name",
    "status_counts",
    "write_manifest",
]
