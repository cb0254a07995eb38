"""Batch inference as Prefect flows: segment a folder or an s3:// prefix with a registered model.

    prefect deployment run predict/cityscapes --param inputs=s3://bucket/frames --param output=s3://bucket/masks

``predict`` orchestrates: it pins the model version once (every shard runs the same version even if
``champion`` moves meanwhile; a ``precision`` the version lacks is refused, naming the ones it has), lists
the inputs, folds the records of an interrupted run into ``manifest.jsonl`` and leaves out what it lists as
done with that version, then splits the rest into ``shards``. With a ``shard_deployment`` every shard is a
flow run of that deployment (``predict-shard``), so each gets its own container or pod and GPU on the pool;
at most ``max_parallel`` run at once (default: the pool's concurrency limit), and a shard that fails or
whose process dies is started again (``retries``) and redoes only its inputs without a record. Without
one, ``shards`` must be 1 and the work runs in this process (a laptop).

Each shard fetches each of its inputs once, checks them all (a corrupt or unsupported file refuses the
shard before it writes anything, unless ``skip_bad``), segments them and appends every finished batch's
records (:class:`components.predict.ManifestWriter`); the flow merges them into ``manifest.jsonl`` at the
end. Watching it: the ``predict-progress`` artifact moves as batches finish, ``predict-shards`` is a table
of every shard's counts, failures, images/s and flow runs, ``predict-summary`` the outcome.

``device`` (auto, cuda, cpu) is where onnxruntime runs, checked where the shards run: the GPU pool
deployments set ``cuda``, so a container without a working GPU fails before it segments anything,
naming what is missing, instead of segmenting on the CPU.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any, Literal
from uuid import UUID

from prefect import flow, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterType,
    FlowRunFilter,
    FlowRunFilterTags,
)
from prefect.futures import wait
from prefect.runtime import flow_run

from components import storage
from components.errors import ConfigError, DataError
from components.predict import (
    MANIFEST,
    InputRef,
    PredictSummary,
    check_collisions,
    is_done,
    list_inputs,
    merge_manifests,
    pin_model,
    segment_inputs,
    status_counts,
)
from components.serving import Device, check_device
from flows.credentials import export_aws_credentials
from flows.logs import show_project_logs
from flows.orchestration import POLL_SECONDS, concurrency_limit, read_deployment, run_in_slot

logger = logging.getLogger(__name__)

WORK_FOLDER = ".predict-work"
"""Under the output: each shard's list of inputs (``<flow run id>/<shard>.jsonl``), deleted at the end."""

Precision = Literal["fp32", "fp16", "int8"]


@flow(name="predict-shard", persist_result=True)
def predict_shard(
    model: str,
    work: str,
    output: str,
    shard: int,
    batch_size: int = 4,
    max_side: int = 2048,
    overlays: bool = True,
    skip_bad: bool = False,
    precision: Precision = "fp32",
    device: Device = "auto",
) -> dict[str, Any]:
    """Segment the inputs listed in ``work`` (a shard's list, written by ``predict``) into ``output``,
    appending their records as shard ``shard``; resumes from those records when run again."""
    show_project_logs()
    check_device(device)  # before fetching anything: a GPU pool's container without a GPU fails here
    export_aws_credentials()
    refs = read_work(work)
    progress = create_progress_artifact(0.0, description=f"shard {shard}: {len(refs)} inputs")
    summary = segment_inputs(
        model, refs, output, batch_size=batch_size, max_side=max_side, overlays=overlays, skip_bad=skip_bad,
        shard=shard, merge=False, device=device, precision=precision, progress=False,
        on_batch=_progress_updater(progress),
    )  # fmt: skip
    return {"inputs": len(refs), **_shard_result(summary)}


def _shard_result(summary: PredictSummary) -> dict[str, Any]:
    """A shard's row of the ``predict-shards`` table (its failed inputs are in the manifest)."""
    return {
        "segmented": len(summary.segmented),
        "resumed": summary.resumed,
        "failed": len(summary.failed),
        "provider": summary.provider,
        "seconds": round(summary.seconds, 2),
        "images_per_second": round(summary.images_per_second, 3),
    }


@flow(name="predict", persist_result=True)
def predict(
    inputs: str,
    output: str,
    model: str = "models:/cityscapes-deeplabv3@champion",
    shards: int = 1,
    shard_deployment: str | None = None,
    max_parallel: int | None = None,
    batch_size: int = 4,
    max_side: int = 2048,
    overlays: bool = True,
    skip_bad: bool = False,
    precision: Precision = "fp32",
    device: Device = "auto",
    retries: int = 2,
) -> dict[str, Any]:
    """Segment ``inputs`` (folder or s3:// prefix) into ``output`` (folder or s3:// prefix) with ``model``
    (``models:/name@alias``, ``models:/name/version`` or an .onnx path/URI) on ``device``, in ``shards``
    flow runs of ``shard_deployment`` (at most ``max_parallel`` at once) or, without one, in this process."""
    show_project_logs()
    if shards < 1 or retries < 0 or (max_parallel is not None and max_parallel < 1):
        raise ConfigError(
            f"need shards >= 1, retries >= 0, max_parallel >= 1: got {shards}, {retries}, {max_parallel}"
        )
    if shards > 1 and not shard_deployment:
        raise ConfigError(
            f"shards={shards} runs each shard as a flow run of a shard deployment: pass shard_deployment "
            "(e.g. predict-shard/cityscapes, deployed by deploy/deploy.sh) or shards=1 to run in this process"
        )
    if shard_deployment:
        slots = _shard_slots(shard_deployment, max_parallel, shards)
    else:
        check_device(device)  # segmenting here: device=cuda without a usable GPU fails before any work
    export_aws_credentials()
    started = time.perf_counter()
    model_uri, model_id = pin_model(model, precision)
    refs = list_inputs(inputs)
    check_collisions(refs)
    done = merge_manifests(output)  # with the records an interrupted run left in its shards' files
    todo = [ref for ref in refs if not is_done(done.get(ref.source), model_id)]
    done_before = len(refs) - len(todo)
    progress = create_progress_artifact(
        0.0, key="predict-progress", description=f"{len(todo)} inputs to segment"
    )
    options = {"batch_size": batch_size, "max_side": max_side, "overlays": overlays, "skip_bad": skip_bad,
               "precision": precision, "device": device}  # fmt: skip
    groups = [todo[i::shards] for i in range(min(shards, len(todo)))]
    if not groups:
        rows: list[dict[str, Any]] = []
    elif shard_deployment:
        rows = _run_on_pool(shard_deployment, model_uri, output, groups, options, slots, retries, progress)
    else:
        rows = [_run_in_process(model_uri, output, todo, options, retries, progress)]
    final = merge_manifests(output)
    segmented = sum(is_done(final.get(ref.source), model_id) for ref in refs) - done_before
    failed = {
        ref.source: final[ref.source]["error"]
        for ref in refs
        if final.get(ref.source, {}).get("status") == "failed"
    }
    seconds = time.perf_counter() - started
    summary = {
        "model": f"{model_id.name} v{model_id.version} ({model_id.precision})",
        "device": device,
        "provider": ", ".join(sorted({row["provider"] for row in rows if row.get("provider")})),
        "inputs": len(refs),
        "segmented": segmented,
        "done_before": done_before,
        "failed": failed,
        "manifest": storage.join(output, MANIFEST),
        "manifest_status": status_counts(final),
        "seconds": round(seconds, 1),
        "images_per_second": round(segmented / seconds, 3),
        "shards": rows,
    }
    _publish_summary(summary, output)
    _raise_for_shards(rows)
    return summary


def _run_in_process(
    model_uri: str, output: str, refs: list[InputRef], options: dict[str, Any], retries: int, progress: UUID
) -> dict[str, Any]:
    """The one shard, as a task of this flow run (retried on anything but bad inputs)."""
    shard_task = segment_task.with_options(
        retries=retries, retry_delay_seconds=5, retry_condition_fn=_not_bad_input
    )
    row = {"shard": 0, "inputs": len(refs), "state": "Completed", "flow_run": flow_run.name}
    row.update(shard_task(model_uri, refs, output, options, progress))
    _update_table([row])
    return row


@task(name="segment-shard")
def segment_task(
    model_uri: str, refs: list[InputRef], output: str, options: dict[str, Any], progress: UUID
) -> dict[str, Any]:
    summary = segment_inputs(
        model_uri, refs, output, shard=0, merge=False, progress=False, on_batch=_progress_updater(progress),
        **options,
    )  # fmt: skip
    return _shard_result(summary)


def _not_bad_input(_task: Any, _run: Any, state: Any) -> bool:
    """Retry a shard unless it refused bad inputs (a retry would refuse them again)."""
    try:
        state.result()
    except DataError:
        return False
    except Exception:
        return True
    return True


def _progress_updater(progress: UUID) -> Callable[[int, int], None]:
    def update(done: int, total: int) -> None:
        update_progress_artifact(
            progress, 100.0 * done / max(total, 1), description=f"{done} of {total} inputs"
        )

    return update


def _run_on_pool(
    deployment: str,
    model_uri: str,
    output: str,
    groups: list[list[InputRef]],
    options: dict[str, Any],
    slots: int,
    retries: int,
    progress: UUID,
) -> list[dict[str, Any]]:
    """Every group as a ``predict-shard`` flow run of ``deployment``, at most ``slots`` at once;
    the run-level progress follows the shards' own progress artifacts while they run."""
    tag = f"predict:{flow_run.id}"
    work_root = storage.join(output, WORK_FOLDER, str(flow_run.id))
    logger.info("%d shards of %s on %s, at most %d at once", len(groups),
                "/".join(str(len(g)) for g in groups), deployment, slots)  # fmt: skip
    futures = []
    with concurrency_limit(f"predict-{flow_run.id}", slots) as limit:
        for shard, group in enumerate(groups):
            work = storage.join(work_root, f"{shard:04d}.jsonl")
            write_work(work, group)
            parameters = {"model": model_uri, "work": work, "output": output, "shard": shard, **options}
            name = f"{flow_run.name}-shard{shard:02d}"
            shard_task = run_shard.with_options(task_run_name=f"shard{shard:02d}")
            futures.append(shard_task.submit(deployment, name, parameters, [tag], limit, retries + 1))
        sizes = [len(group) for group in groups]
        rows: list[dict[str, Any] | None] = [None] * len(groups)
        with get_client(sync_client=True) as client:
            while any(row is None for row in rows):
                wait(futures, timeout=POLL_SECONDS)
                finished = [i for i, f in enumerate(futures) if rows[i] is None and f.state.is_final()]
                for i in finished:
                    rows[i] = _shard_row(i, sizes[i], futures[i])
                fraction = _pool_progress(client, tag, sizes, rows)
                update_progress_artifact(progress, 100.0 * fraction)
                if finished:
                    _update_table([row for row in rows if row is not None])
    for shard in range(len(groups)):
        storage.delete(storage.join(work_root, f"{shard:04d}.jsonl"))
    return [row for row in rows if row is not None]


@task(name="predict-shard")
def run_shard(
    deployment: str, name: str, parameters: dict[str, Any], tags: list[str], limit: str, attempts: int
) -> dict[str, Any]:
    """Run one shard's flow run, again (a new flow run that resumes from the shard's records) while it
    fails or crashes, up to ``attempts`` times; bad inputs are not retried."""
    outcome: dict[str, Any] = {"attempts": 0}
    for attempt in range(1, attempts + 1):
        child = run_in_slot(
            limit, deployment, name if attempt == 1 else f"{name}-retry{attempt - 1}", parameters, tags
        )
        state = child.state
        outcome.update(attempts=attempt, flow_run=child.name, flow_run_id=str(child.id))
        outcome.update(
            state=state.name if state else "Unknown", message=state.message if state else "no state"
        )
        if state is not None and state.is_completed():
            return {**outcome, "message": None, **state.result()}
        logger.warning(
            "%s (flow run %s) ended %s: %s", child.name, child.id, outcome["state"], outcome["message"]
        )
        if "DataError" in (outcome["message"] or ""):
            break  # bad inputs are refused again by any retry
    return outcome


def _shard_row(shard: int, inputs: int, future: Any) -> dict[str, Any]:
    try:
        outcome = future.result()
    except Exception as exc:  # the task itself failed (e.g. the API was unreachable)
        outcome = {"state": "Error", "message": str(exc)}
    return {"shard": shard, "inputs": inputs, **outcome}


def _shard_slots(deployment: str, max_parallel: int | None, shards: int) -> int:
    """How many shards run at once: ``max_parallel``, else the concurrency limit of the shard deployment's
    work pool, else every shard (the pool queues them). A missing deployment is a ConfigError."""
    pool_name = read_deployment(deployment).work_pool_name
    if max_parallel:
        return max_parallel
    with get_client(sync_client=True) as client:
        limit = client.read_work_pool(pool_name).concurrency_limit
    if limit:
        return limit
    logger.info("work pool %s has no concurrency limit: all %d shards may run at once (set max_parallel "
                "or the pool's limit to bound them)", pool_name, shards)  # fmt: skip
    return shards


def _pool_progress(client: Any, tag: str, sizes: list[int], rows: list[dict[str, Any] | None]) -> float:
    """Fraction of the run's inputs done: a finished shard counts whole, a running one by the latest value of
    its flow runs' progress artifacts."""
    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])))
    shard_of = {run.id: int(run.parameters["shard"]) for run in runs}
    of_shards = ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=list(shard_of)), type=ArtifactFilterType(any_=["progress"])
    )
    artifacts = client.read_artifacts(artifact_filter=of_shards) if shard_of else []
    fractions = [1.0 if row is not None and row.get("state") == "Completed" else 0.0 for row in rows]
    for artifact in artifacts:
        shard = shard_of[artifact.flow_run_id]
        fractions[shard] = max(fractions[shard], float(artifact.data) / 100.0)
    return sum(f * n for f, n in zip(fractions, sizes, strict=True)) / max(sum(sizes), 1)


def _update_table(rows: list[dict[str, Any]]) -> None:
    columns = ("shard", "state", "attempts", "flow_run", "inputs", "segmented", "resumed", "failed",
               "images_per_second", "seconds", "provider", "message")  # fmt: skip
    create_table_artifact(
        [{column: row.get(column) for column in columns} for row in sorted(rows, key=lambda r: r["shard"])],
        key="predict-shards",
        description="Per shard: inputs, segmented, resumed after a retry, failed, images/s, flow runs",
    )


def _publish_summary(summary: dict[str, Any], output: str) -> None:
    failures = "".join(f"\n| `{k}` | {v} |" for k, v in summary["failed"].items())
    incomplete = sum(row.get("state") != "Completed" for row in summary["shards"])
    text = (
        f"# Batch inference with {summary['model']}\n\n"
        f"{summary['inputs']} inputs: {summary['segmented']} segmented, {summary['done_before']} done "
        f"before, {len(summary['failed'])} failed; {summary['images_per_second']} images/s over "
        f"{summary['seconds']} s in {len(summary['shards'])} shard(s) on {summary['provider'] or 'none'} "
        f"(device={summary['device']}).\n\nOutputs and manifest: `{output}`\n"
    )
    if failures:
        text += f"\n| failed input | reason |\n|---|---|{failures}\n"
    if incomplete:
        text += (
            f"\n{incomplete} shard(s) did not complete (`predict-shards`): a rerun redoes only their rest.\n"
        )
    create_markdown_artifact(
        key="predict-summary",
        markdown=text,
        description="Counts, failures, throughput and execution provider of this batch inference run",
    )


def _raise_for_shards(rows: list[dict[str, Any]]) -> None:
    failed = [row for row in rows if row.get("state") != "Completed"]
    if not failed:
        return
    lines = "\n  ".join(
        f"shard {row['shard']} ({row.get('flow_run', '?')}, {row.get('attempts', 0)} attempt(s)) ended "
        f"{row.get('state')}: {row.get('message')}"
        for row in failed
    )
    error = DataError if all("DataError" in (row.get("message") or "") for row in failed) else RuntimeError
    raise error(
        f"{len(failed)} of {len(rows)} shard(s) did not complete (the others' outputs and records are kept; "
        f"a rerun redoes only the missing inputs):\n  {lines}"
    )


def write_work(uri: str, refs: list[InputRef]) -> None:
    storage.write_bytes(uri, "".join(json.dumps([r.source, r.relative]) + "\n" for r in refs).encode())


def read_work(uri: str) -> list[InputRef]:
    return [InputRef(*json.loads(line)) for line in storage.read_bytes(uri).decode().splitlines() if line]
