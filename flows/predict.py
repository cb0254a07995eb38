"""Batch inference as a Prefect flow: segment a folder or an s3:// prefix with a registered model.

    prefect deployment run predict/cityscapes --param inputs=s3://bucket/frames --param output=s3://bucket/masks

The alias is resolved once (every shard uses the same version even if ``champion`` moves meanwhile). All
inputs are checked first (corrupt or unsupported files refuse the run before anything is written, unless
``skip_bad``); then shards run as concurrent tasks with retries, each recording its inputs in a
``manifest.<shard>.jsonl`` after every batch; the flow merges them into ``manifest.jsonl``. A rerun into
the same output skips what a manifest lists as done with that version, so an interrupted run resumes.

``device`` (auto, cuda, cpu) is where onnxruntime runs: the GPU pool deployments set ``cuda``, so a
container without a working GPU fails before any shard starts, naming what is missing, instead of
segmenting on the CPU. The provider that ran is in every manifest line and in the ``predict-summary``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact

from components import storage
from components.predict import (
    MANIFEST,
    MAX_PIXELS,
    InputRef,
    check_collisions,
    check_inputs,
    list_inputs,
    merge_manifests,
    refuse,
    resolve_model,
    segment_inputs,
    shard_manifest_name,
)
from components.serving import Device, check_device
from flows.credentials import export_aws_credentials
from flows.logs import show_project_logs

logger = logging.getLogger(__name__)


@task(name="check-inputs")
def check_task(refs: list[InputRef], max_pixels: int) -> dict[str, str]:
    return check_inputs(refs, max_pixels)


@task(name="segment-shard")
def segment_task(
    model_uri: str, refs: list[InputRef], output: str, shard: int, options: dict[str, Any]
) -> dict:
    summary = segment_inputs(
        model_uri, refs, output, manifest_name=shard_manifest_name(shard), progress=False, **options
    )
    return {
        "segmented": len(summary.segmented),
        "resumed": summary.resumed,
        "failed": summary.failed,
        "provider": summary.provider,
    }


@flow(name="predict", persist_result=True)
def predict(
    inputs: str,
    output: str,
    model: str = "models:/cityscapes-deeplabv3@champion",
    shards: int = 4,
    batch_size: int = 4,
    max_side: int = 2048,
    overlays: bool = True,
    skip_bad: bool = False,
    precision: Literal["fp32", "fp16", "int8"] = "fp32",
    device: Device = "auto",
    retries: int = 2,
) -> dict[str, Any]:
    """Segment ``inputs`` (folder or s3:// prefix) into ``output`` (folder or s3:// prefix) with ``model``
    (``models:/name@alias``, ``models:/name/version`` or an .onnx path/URI) on ``device``."""
    show_project_logs()
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    # device=cuda without a usable GPU fails here, once, rather than in every shard and its retries.
    check_device(device)
    export_aws_credentials()
    started = time.perf_counter()
    refs = list_inputs(inputs)
    check_collisions(refs)
    # Downloads the ONNX file once, into the cache the shards read.
    _, version = resolve_model(model, precision=precision)
    model_uri = f"models:/{version.name}/{version.version}" if model.startswith("models:/") else model
    groups = [refs[i::shards] for i in range(min(shards, len(refs)))]
    checks = [check_task.submit(group, MAX_PIXELS) for group in groups]
    problems = {k: v for check in checks for k, v in check.result().items()}
    if problems and not skip_bad:
        refuse(problems)
    progress = create_progress_artifact(0.0, key="predict-progress", description=f"{len(refs)} inputs")
    options = {
        "batch_size": batch_size,
        "max_side": max_side,
        "overlays": overlays,
        "skip_bad": skip_bad,
        "precision": precision,
        "device": device,
    }
    shard_task = segment_task.with_options(retries=retries, retry_delay_seconds=5)
    futures = [shard_task.submit(model_uri, group, output, i, options) for i, group in enumerate(groups)]
    results = []
    for future in futures:
        results.append(future.result())
        update_progress_artifact(progress, 100.0 * len(results) / len(futures))
        logger.info("shard %d of %d done: %s", len(results), len(futures), results[-1])
    counts = merge_manifests(output)
    seconds = time.perf_counter() - started
    segmented = sum(r["segmented"] for r in results)
    provider = ", ".join(sorted({r["provider"] for r in results}))
    summary = {
        "model": f"{version.name} v{version.version} ({version.precision})",
        "device": device,
        "provider": provider,
        "inputs": len(refs),
        "segmented": segmented,
        "resumed": sum(r["resumed"] for r in results),
        "failed": {k: v for r in results for k, v in r["failed"].items()},
        "manifest": storage.join(output, MANIFEST),
        "manifest_status": counts,
        "seconds": round(seconds, 1),
        "images_per_second": round(segmented / seconds, 3),
    }
    failures = "".join(f"\n| `{k}` | {v} |" for k, v in summary["failed"].items())
    create_markdown_artifact(
        key="predict-summary",
        markdown=(
            f"# Batch inference with {summary['model']}\n\n"
            f"{len(refs)} inputs: {segmented} segmented, {summary['resumed']} done before, "
            f"{len(summary['failed'])} failed; {summary['images_per_second']} images/s over "
            f"{summary['seconds']} s on {provider} (device={device}).\n\nOutputs and manifest: `{output}`\n"
            + (f"\n| failed input | reason |\n|---|---|{failures}\n" if failures else "")
        ),
        description="Counts, failures, throughput and execution provider of this batch inference run",
    )
    return summary
