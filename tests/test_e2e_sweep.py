"""The ``sweep`` flow: its points and validation (fast), and end to end as a user runs it (slow): the stack of
tests/prefectstack.py, the local variant deployed with deploy/deploy.sh, ``prefect deployment run
sweep/cityscapes-local`` with 3 points of the tiny demo config at concurrency 2, one of which fails in
training. The sweep completes, ranks the points, reports the failed one and registers only the best; a sweep
with an invalid point fails before any point starts."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.config import load_config
from components.errors import ConfigError
from flows.sweep import parse_grid, sweep_points, validate_points
from tests.prefectstack import (
    MODEL_NAME,
    ROOT,
    Stack,
    client_calls,
    local_worker,
    log_tail,
    runs_of,
    stack_fixture,  # noqa: F401 (the "stack" fixture)
    tiny_overrides,
)

# --- points and validation ------------------------------------------------------------------------


def test_grid_is_a_cartesian_product_then_the_explicit_points() -> None:
    grid = {"optimizer.lr": [1e-5, 0.01], "model.backbone": ["resnet50", "mobilenet_v3_large"]}
    points = sweep_points(grid, [["train.seed=3"]])
    assert points == [
        ["optimizer.lr=1.0e-05", "model.backbone=resnet50"],
        ["optimizer.lr=1.0e-05", "model.backbone=mobilenet_v3_large"],
        ["optimizer.lr=0.01", "model.backbone=resnet50"],
        ["optimizer.lr=0.01", "model.backbone=mobilenet_v3_large"],
        ["train.seed=3"],
    ]
    assert load_config("demo", points[0]).optimizer.lr == 1e-5
    assert sweep_points(None, [["train.seed=1"]]) == [["train.seed=1"]]
    assert sweep_points({"augment.crop": [[64, 128]]}, None) == [["augment.crop=[64, 128]"]]
    with pytest.raises(ConfigError, match="no points"):
        sweep_points(None, None)
    with pytest.raises(ConfigError, match=r"optimizer\.lr"):
        sweep_points({"optimizer.lr": []}, None)
    assert parse_grid(["optimizer.lr=[0.005, 0.01]"]) == {"optimizer.lr": [0.005, 0.01]}
    with pytest.raises(ConfigError, match="--grid"):
        parse_grid(["optimizer.lr=0.005"])


def test_an_invalid_point_is_named() -> None:
    with pytest.raises(ConfigError, match=r"sweep point p1 \(train.epochs=zero\): .*train.epochs"):
        validate_points("demo", ["train.seed=0"], [["train.epochs=1"], ["train.epochs=zero"]])
    # Two points pinned to one training folder would resume each other's checkpoints.
    with pytest.raises(ConfigError, match=r"p0 and p1 both pin train\.output_dir=/tmp/x:"):
        validate_points("demo", ["train.output_dir=/tmp/x"], [["train.seed=0"], [], ["train.seed=1"]])
    validate_points("demo", [], [[f"train.output_dir=/tmp/{i}"] for i in range(3)])


def test_each_variant_sweeps_its_own_finetune_deployment_from_a_cpu_pool() -> None:
    deployments = yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())["deployments"]
    sweeps = [d for d in deployments if d["entrypoint"] == "flows/sweep.py:sweep"]
    assert {d["name"] for d in sweeps} == {"cityscapes", "cityscapes-k8s", "cityscapes-local"}
    finetunes = {d["name"] for d in deployments if d["entrypoint"] == "flows/finetune.py:finetune"}
    for sweep in sweeps:
        assert sweep["parameters"]["deployment"] == f"finetune/{sweep['name']}"
        assert sweep["name"] in finetunes
        assert sweep["work_pool"]["name"] in {"cpu-docker", "cpu-k8s", "local"}


# --- end to end -----------------------------------------------------------------------------------


def _max_overlap(runs: list[Any]) -> int:
    """The most flow runs that were running at one instant (from their start and end times)."""
    events: list[tuple[datetime, int]] = []
    for run in runs:
        events += [(run.start_time, 1), (run.end_time, -1)]
    running = peak = 0
    for _, step in sorted(events, key=lambda event: (event[0], event[1])):  # an end before a start
        running += step
        peak = max(peak, running)
    return peak


def _sweep_params(work: Path, points: list[list[str]], grid: dict[str, list[Any]] | None = None) -> str:
    return json.dumps(
        {
            "recipe": "demo",
            "base_overrides": tiny_overrides(work, pin_output_dir=False),
            "grid": grid,
            "points": points,
            "concurrency": 2,
        }
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sweep_end_to_end(stack: Stack) -> None:
    from mlflow import MlflowClient

    grid = {"optimizer.lr": [0.005, 0.02]}
    # p2 passes validation but fails in training: a batch of 8 from 4 training images.
    params = _sweep_params(stack.work, [["train.global_batch_size=8"]], grid)
    invalid = _sweep_params(stack.work, [["train.seed=1"], ["train.epochs=zero"]])
    with local_worker(stack) as worker_log:
        started = stack.cli("prefect", "deployment", "run", "sweep/cityscapes-local", "--params", invalid)
        assert started.returncode == 0, started.stdout + started.stderr
        run = stack.cli(
            "prefect", "deployment", "run", "sweep/cityscapes-local", "--params", params,
            "--watch", "--watch-timeout", "780", timeout=800,
        )  # fmt: skip
        assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{log_tail(worker_log, 150)}"

    flow_runs, task_runs = runs_of(stack.api_url)
    sweeps = [r for r in flow_runs if r.name.startswith("sweep-demo-") and r.parent_task_run_id is None]
    (sweep,) = [r for r in sweeps if r.parameters.get("grid")]
    (rejected,) = [r for r in sweeps if r is not sweep]
    assert sweep.state.name == "Completed"

    # The invalid sweep failed up front, naming its point, and started nothing.
    assert rejected.state.name == "Failed"
    assert "sweep point p1 (train.epochs=zero)" in rejected.state.message
    assert not [r for r in flow_runs if r.name.startswith(f"{rejected.name}-")]

    # One finetune flow run per point, named after the sweep run and the point, tagged with its id, a
    # subflow of the sweep; at most 2 ran at once (and 2 did).
    points = sorted(
        (r for r in flow_runs if re.fullmatch(rf"{sweep.name}-p\d+", r.name)), key=lambda r: r.name
    )
    assert [r.name for r in points] == [f"{sweep.name}-p{i}" for i in range(3)]
    for point in points:
        assert f"sweep:{sweep.id}" in point.tags
        assert task_runs[point.parent_task_run_id].flow_run_id == sweep.id
        assert point.parameters["register_model"] is False
    assert [r.state.name for r in points] == ["Completed", "Completed", "Failed"]
    assert _max_overlap(points) == 2
    assert client_calls(stack.api_url, lambda c: c.read_global_concurrency_limits()) == []  # cleaned up

    # The ranking: the completed points by val mIoU, then the failed one with its state and flow run.
    artifacts = client_calls(stack.api_url, lambda c: c.read_artifacts())
    table = next(a for a in artifacts if a.key == "sweep-ranking" and a.flow_run_id == sweep.id)
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [row["rank"] for row in rows] == [1, 2, None]
    assert rows[0]["finetuned_miou"] >= rows[1]["finetuned_miou"]
    failed = rows[2]
    assert failed["point"] == "p2" and failed["status"] == "Failed"
    assert failed["flow_run_id"] == str(points[2].id) and failed["overrides"] == "train.global_batch_size=8"
    assert {"sweep-summary", "mlflow-sweep-run", "registered-model-version"} <= {
        a.key for a in artifacts if a.flow_run_id == sweep.id
    }
    best = rows[0]

    # MLflow: the sweep's parent run holds the ranking; the points' pipeline runs are its children.
    client = MlflowClient(stack.tracking_uri)
    experiment = client.get_experiment_by_name("cityscapes-deeplabv3")
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    parent = runs[sweep.name]
    assert parent.info.status == "FINISHED" and parent.data.tags["prefect_flow_run_id"] == str(sweep.id)
    assert parent.data.params["sweep.concurrency"] == "2" and parent.data.params["sweep.points"] == "3"
    assert parent.data.tags["sweep.best_point"] == best["point"]
    assert parent.data.metrics["points_failed"] == 1
    ranking = json.loads(
        Path(client.download_artifacts(parent.info.run_id, "sweep_ranking.json", str(stack.work))).read_text()
    )
    assert [row[ranking["columns"].index("point")] for row in ranking["data"]] == [r["point"] for r in rows]
    for i, status in enumerate(["FINISHED", "FINISHED", "FAILED"]):
        point_run = runs[f"{sweep.name}-p{i}"]
        assert point_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert point_run.info.status == status
    assert best["mlflow_run_id"] == runs[f"{sweep.name}-{best['point']}"].info.run_id

    # Exactly one version registered: the best point's (champion too: the registry was empty).
    (version,) = client.search_model_versions(f"name = '{MODEL_NAME}'")
    training_run = client.get_run(version.tags["training_run_id"])
    assert training_run.data.tags["mlflow.parentRunId"] == best["mlflow_run_id"]
    assert abs(float(version.tags["val_miou"]) - best["finetuned_miou"]) < 1e-4
    aliases = client.get_model_version(MODEL_NAME, version.version).aliases  # search results lack them
    assert sorted(aliases) == ["challenger", "champion"]
