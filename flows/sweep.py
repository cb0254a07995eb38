"""The ``sweep`` flow: one ``finetune`` deployment run per point of a grid or list of overrides, at most
``concurrency`` at once, ranked by val mIoU; only the best point is registered.

    prefect deployment run sweep/cityscapes --params \\
        '{"recipe": "strong", "grid": {"optimizer.lr": [0.005, 0.01], "train.seed": [0, 1]}}'

Each point is a ``run_deployment(deployment)`` with ``register_model=False``, named ``<sweep run>-p<i>``
and tagged ``sweep:<sweep flow run id>``; its overrides are the deployment's default ``overrides``, then
``base_overrides``, then the point's own. Every point's config is validated before anything starts.

Concurrency: a Prefect global concurrency limit ``sweep-<flow run id>`` with ``concurrency`` slots, created
for this flow run and deleted at its end; each point holds a slot (a lease) while its flow run runs.

A point whose flow run does not complete is reported (state, flow run id, message) and ranked last; the
sweep fails only if every point failed. The best completed point goes through the register stage: it
becomes ``challenger``, and ``champion`` only through the registry's margin gate.

MLflow: the sweep is a parent run named like its flow run, with the ``sweep.*`` settings as params and the
ranking as the table ``sweep_ranking.json``; the points' pipeline runs are its children.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL

from components import tracking
from components.cli import run_cli
from components.config import Config, load_config
from components.errors import ConfigError
from components.registry import registration_text
from flows.logs import show_project_logs
from flows.orchestration import (
    concurrency_limit,
    link_registered_version,
    pipeline_run,
    read_deployment,
    run_in_slot,
    run_stage,
)
from flows.stages import register_stage

RANKING_FILE = "sweep_ranking.json"


class SweepFailed(RuntimeError):
    """No point of the sweep completed."""


def sweep_run_name() -> str:
    """``sweep-<recipe>-<first 8 hex digits of the flow run id>``, e.g. ``sweep-demo-1f0c2a9b``."""
    return f"sweep-{Path(str(flow_run.parameters.get('recipe', 'strong'))).stem}-{str(flow_run.id)[:8]}"


def _override(key: str, value: Any) -> str:
    """``key=value`` with non-strings in YAML flow style (``1.0e-05``, ``[64, 128]``)."""
    if isinstance(value, str):
        return f"{key}={value}"
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000)
    return f"{key}={text.strip().removesuffix('...').strip()}"


def sweep_points(grid: dict[str, list[Any]] | None, points: list[list[str]] | None) -> list[list[str]]:
    """The points' own overrides: the grid's cartesian product (first key slowest), then ``points``."""
    for key, values in (grid or {}).items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep grid {key}: give a non-empty list of values, got {values!r}")
    keys = list(grid or {})
    product = itertools.product(*(grid or {}).values()) if keys else []
    expanded = [[_override(key, value) for key, value in zip(keys, combo, strict=True)] for combo in product]
    expanded += [list(point) for point in points or []]
    if not expanded:
        raise ConfigError("the sweep has no points: give a grid, points, or both")
    return expanded


def _pinned_output_dir(overrides: list[str]) -> str | None:
    pinned = [o.partition("=")[2] for o in overrides if o.startswith("train.output_dir=")]
    return pinned[-1] if pinned else None


def validate_points(recipe: str, common: list[str], own: list[list[str]]) -> None:
    """Every point's config (``common`` + its ``own`` overrides) is valid and no two points train in the
    same pinned ``train.output_dir`` (they would resume each other's checkpoints); a ConfigError names the
    point."""
    trains_in: dict[str, int] = {}
    for index, point in enumerate(own):
        overrides = [*common, *point]
        try:
            load_config(recipe, overrides)
        except ConfigError as exc:
            raise ConfigError(f"sweep point p{index} ({shlex.join(point)}): {exc}") from None
        output_dir = _pinned_output_dir(overrides)
        if output_dir is not None and output_dir in trains_in:
            raise ConfigError(
                f"sweep points p{trains_in[output_dir]} and p{index} both pin train.output_dir={output_dir}: "
                "drop that override (each flow run then trains in its own folder) or give each point its own"
            )
        if output_dir is not None:
            trains_in[output_dir] = index


def deployment_overrides(deployment: str) -> list[str]:
    """The deployment's default ``overrides`` (parameters passed to run_deployment replace them)."""
    return list(read_deployment(deployment).parameters.get("overrides") or [])


@task(name="sweep-point")
def run_point(
    deployment: str, name: str, parameters: dict[str, Any], tags: list[str], limit: str
) -> dict[str, Any]:
    """Start the point's flow run once a slot of ``limit`` is free, wait for it, return its outcome."""
    child = run_in_slot(limit, deployment, name, parameters, tags)
    state = child.state
    outcome: dict[str, Any] = {"flow_run": name, "flow_run_id": str(child.id)}
    if state is None:
        return {**outcome, "status": "Unknown", "message": "no state"}
    if not state.is_completed():
        return {**outcome, "status": state.name, "message": state.message}
    return {**outcome, "status": state.name, "message": None, "result": state.result()}


def _outcome(future: Any, name: str) -> dict[str, Any]:
    """A point task's outcome; a task that raised (e.g. the API was unreachable) is a failed point."""
    try:
        return future.result()
    except Exception as exc:
        return {"flow_run": name, "flow_run_id": None, "status": "Error", "message": str(exc)}


def _row(index: int, point: list[str], outcome: dict[str, Any]) -> dict[str, Any]:
    """One row of the ranking table (mIoU as fractions, 4 decimals; None for a failed point)."""
    result = outcome.get("result") or {}
    return {
        "rank": None,
        "point": f"p{index}",
        "overrides": shlex.join(point),
        "finetuned_miou": round(result["finetuned_miou"], 4) if result else None,
        "baseline_miou": round(result["baseline_miou"], 4) if result else None,
        "status": outcome["status"],
        "flow_run": outcome["flow_run"],
        "flow_run_id": outcome["flow_run_id"],
        "mlflow_run_id": result.get("mlflow_run_id"),
        "message": outcome["message"],
    }


def rank(outcomes: list[dict[str, Any]]) -> list[int]:
    """Indices of the completed points, highest val mIoU first (ties: lower point index first)."""
    completed = [i for i, outcome in enumerate(outcomes) if outcome.get("result")]
    return sorted(completed, key=lambda i: -outcomes[i]["result"]["finetuned_miou"])


def _start_points(
    deployment: str, recipe: str, point_overrides: list[list[str]], mlflow_parent: str, limit: str
) -> list[dict[str, Any]]:
    """One ``run_point`` task per point (all submitted; the limit's slots gate the flow runs)."""
    futures = []
    for index, overrides in enumerate(point_overrides):
        name = f"{flow_run.name}-p{index}"
        parameters = {
            "recipe": recipe,
            "overrides": [*overrides, f"tracking.parent_run_id={mlflow_parent}"],
            "register_model": False,
            "run_name": name,
        }
        point_task = run_point.with_options(task_run_name=f"p{index}")
        futures.append(point_task.submit(deployment, name, parameters, [f"sweep:{flow_run.id}"], limit))
    return [_outcome(future, f"{flow_run.name}-p{i}") for i, future in enumerate(futures)]


@flow(name="sweep", flow_run_name=sweep_run_name)
def sweep(
    recipe: str = "strong",
    grid: dict[str, list[Any]] | None = None,
    points: list[list[str]] | None = None,
    base_overrides: list[str] | None = None,
    deployment: str = "finetune/cityscapes",
    concurrency: int = 2,
) -> dict[str, Any]:
    """Run ``deployment`` once per point (``grid``: key -> values, cartesian product; ``points``: explicit
    override lists), at most ``concurrency`` at once; register the point with the highest val mIoU."""
    show_project_logs()
    if concurrency < 1:
        raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
    own = sweep_points(grid, points)
    common = [*deployment_overrides(deployment), *(base_overrides or [])]
    cfg = load_config(recipe, common)  # the settings every point shares, then each point's
    validate_points(recipe, common, own)
    with pipeline_run(cfg, tags={"sweep": "true"}) as (run_id, metrics):
        with concurrency_limit(f"sweep-{flow_run.id}", concurrency) as limit:
            outcomes = _start_points(deployment, recipe, [[*common, *p] for p in own], run_id, limit)
        rows = [_row(index, own[index], outcome) for index, outcome in enumerate(outcomes)]
        order = rank(outcomes)
        for position, index in enumerate(order, start=1):
            rows[index]["rank"] = position
        settings = {"deployment": deployment, "concurrency": concurrency, "points": len(own)}
        _publish(cfg, run_id, rows, order, settings)
        registered = _register_best(cfg, rows, outcomes, order)
        metrics.update(best_finetuned_miou=outcomes[order[0]]["result"]["finetuned_miou"])
        metrics.update(points_failed=len(own) - len(order))
    return {"best_point": order[0], "registered": registered, "ranking": rows, "mlflow_run_id": run_id}


def _publish(
    cfg: Config, run_id: str, rows: list[dict[str, Any]], order: list[int], settings: dict[str, Any]
) -> None:
    """The ranking (best first, then the failed points) as a Prefect table artifact and an MLflow table on
    the sweep's run, with the settings as ``sweep.*`` params; every failed point is a warning in the flow
    run's log."""
    ranked = [rows[i] for i in order] + [row for row in rows if row["rank"] is None]
    create_table_artifact(ranked, key="sweep-ranking", description=f"Sweep {flow_run.name}: best first")
    create_link_artifact(
        tracking.run_url(cfg, run_id),
        link_text=f"MLflow sweep run {run_id}",
        key="mlflow-sweep-run",
    )
    tags = {"sweep.best_point": f"p{order[0]}"} if order else {}
    params = {f"sweep.{key}": value for key, value in settings.items()}
    tracking.log_table_run(cfg, run_id, RANKING_FILE, ranked, params=params, tags=tags)
    for row in rows:
        if row["rank"] is None:
            get_run_logger().warning(
                "sweep point %s (flow run %s, id %s) ended %s: %s",
                row["point"], row["flow_run"], row["flow_run_id"], row["status"], row["message"],
            )  # fmt: skip


def _register_best(
    cfg: Config, rows: list[dict[str, Any]], outcomes: list[dict[str, Any]], order: list[int]
) -> dict[str, Any]:
    """Register the best point through the register stage (challenger; champion only through the margin
    gate) and summarise the sweep; SweepFailed if no point completed."""
    failed = [row for row in rows if row["rank"] is None]
    if not order:
        raise SweepFailed(f"all {len(rows)} points of the sweep failed; see the sweep-ranking artifact")
    best = rows[order[0]]
    candidate = outcomes[order[0]]["result"]["candidate"]
    registered = run_stage(
        load_config(candidate["recipe"], candidate["overrides"]), "register", register_stage, **candidate
    )
    link_registered_version(cfg, registered)
    failures = ", ".join(f"{row['point']} ({row['status']}, flow run {row['flow_run_id']})" for row in failed)
    create_markdown_artifact(
        f"Best of {len(rows)} points: **{best['point']}** ({best['overrides']}), val mIoU "
        f"{100 * best['finetuned_miou']:.2f}%; registered {registration_text(registered)}. "
        f"Failed points: {failures or 'none'}.",
        key="sweep-summary",
    )
    return registered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.sweep",
        description="Run the sweep flow in this process against PREFECT_API_URL, where the finetune "
        "deployment and a worker of its pool must run.",
    )
    parser.add_argument("--recipe", default="demo", help="recipe name (demo, paper, strong) or YAML path")
    parser.add_argument("--deployment", default="finetune/cityscapes-local")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument(
        "--grid", action="append", default=[], metavar="KEY=[V1, V2]", help="a grid axis (YAML list)"
    )
    parser.add_argument(
        "--point", action="append", default=[], metavar="'K=V K=V'", help="one point's overrides"
    )
    parser.add_argument("base_overrides", nargs="*", help="overrides of every point, e.g. train.epochs=2")
    args = parser.parse_args(argv)

    def run() -> None:
        if not PREFECT_API_URL.value():
            raise ConfigError("set PREFECT_API_URL to the Prefect server that runs the finetune deployment")
        result = sweep(
            recipe=args.recipe,
            grid=parse_grid(args.grid) or None,
            points=[shlex.split(point) for point in args.point] or None,
            base_overrides=args.base_overrides,
            deployment=args.deployment,
            concurrency=args.concurrency,
        )
        registered = result["registered"]
        print(f"best point p{result['best_point']}: {registration_text(registered)}")

    return run_cli(run)


def parse_grid(axes: list[str]) -> dict[str, list[Any]]:
    """``["optimizer.lr=[0.005, 0.01]"]`` -> ``{"optimizer.lr": [0.005, 0.01]}``."""
    grid = {}
    for axis in axes:
        key, sep, raw = axis.partition("=")
        values = yaml.safe_load(raw) if sep else None
        if not isinstance(values, list):
            raise ConfigError(f"--grid {axis!r} must look like key=[value, value]")
        grid[key.strip()] = values
    return grid


if __name__ == "__main__":
    raise SystemExit(main())
