"""Flow logic against a real (temporary) Prefect server: config validation, skipped data preparation,
secrets, the artifacts' IoU table; the whole flow through its CLI: one MLflow parent run per pipeline
run with the stages as children, and a clean console."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID, uuid4

import mlflow
import pytest
from prefect import flow
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.testing.utilities import prefect_test_harness

from components import tracking
from components.config import load_config
from components.data.prepare import dataset_fingerprint
from components.errors import ConfigError
from flows.credentials import cityscapes_credentials, export_aws_credentials
from flows.finetune import finetune, iou_table
from flows.orchestration import close_abandoned_runs
from flows.stages import prepare_data

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _tiny_data(root: Path) -> list[str]:
    return [
        f"data.root={root}",
        "data.synthetic={train: 2, val: 2, height: 64, width: 128, cities: 1, seed: 0}",
        "data.trainid_workers=1",
    ]


def _task_states(flow_run_id: UUID, timeout: float = 30) -> dict[str, str]:
    """Task run states of a finished flow run. Prefect 3 records task states from events, which the
    server may persist a moment after the flow returned: wait until every task run has one."""
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            task_runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            if (task_runs and all(run.state for run in task_runs)) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    # Task run names are "<task name>-<short id>".
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in task_runs}


def test_invalid_config_fails_before_any_work(prefect_server: None, tmp_path: Path) -> None:
    state = finetune(
        recipe="demo", overrides=[f"run_dir={tmp_path / 'run'}", "train.epochs=0"], return_state=True
    )
    assert state.is_failed()
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        state.result()
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_prepare_stage_skips_unchanged_data_and_redoes_changed(prefect_server: None, tmp_path: Path) -> None:
    root = tmp_path / "cityscapes"
    overrides = _tiny_data(root)

    first = prepare_data(recipe="demo", overrides=overrides, return_state=True)
    prepared = first.result()
    assert prepared == {"root": str(root.resolve()), "fingerprint": dataset_fingerprint(root)}
    assert _task_states(first.state_details.flow_run_id) == {"prepare-dataset": "Completed"}

    second = prepare_data(recipe="demo", overrides=overrides, return_state=True)
    assert second.result() == prepared
    assert _task_states(second.state_details.flow_run_id) == {"prepare-dataset": "Skipped"}

    # A lost label file changes the fingerprint: the stage prepares again and restores it.
    label = next(root.glob("gtFine/val/*/*_labelTrainIds.png"))
    label.unlink()
    third = prepare_data(recipe="demo", overrides=overrides, return_state=True)
    assert third.result() == prepared
    assert label.is_file()
    assert _task_states(third.state_details.flow_run_id) == {"prepare-dataset": "Completed"}

    # So does a different data config (another synthetic seed).
    fourth = prepare_data(recipe="demo", overrides=[*overrides, "data.synthetic.seed=1"], return_state=True)
    assert fourth.result()["fingerprint"] == dataset_fingerprint(root)
    assert _task_states(fourth.state_details.flow_run_id) == {"prepare-dataset": "Completed"}


def test_secrets_come_from_blocks_then_environment(
    prefect_server: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CITYSCAPES_USERNAME", "env-user")
    monkeypatch.setenv("CITYSCAPES_PASSWORD", "env-password")
    assert cityscapes_credentials() == ("env-user", "env-password")
    Secret(value="block-password").save("cityscapes-password", overwrite=True)
    Secret(value="block-key-id").save("aws-access-key-id", overwrite=True)
    try:
        assert cityscapes_credentials() == ("env-user", "block-password")
        monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
        export_aws_credentials()
        assert os.environ["AWS_ACCESS_KEY_ID"] == "block-key-id"
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key-id")  # the environment wins when set
        export_aws_credentials()
        assert os.environ["AWS_ACCESS_KEY_ID"] == "env-key-id"
    finally:
        Secret.delete("cityscapes-password")
        Secret.delete("aws-access-key-id")
    monkeypatch.delenv("CITYSCAPES_PASSWORD")
    assert cityscapes_credentials() is None


def test_pipeline_runs_of_ended_flow_runs_are_closed(prefect_server: None, tmp_path: Path) -> None:
    """A killed process leaves its pipeline run RUNNING: the next flow run closes it once Prefect reports
    the flow run ended; runs of live flow runs, and of flow runs this server does not know, stay."""
    from prefect.states import Crashed, Running

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(
        "demo", [f"run_dir={tmp_path}", f"tracking.tracking_uri={uri}", "tracking.system_metrics=false"]
    )
    with get_client(sync_client=True) as client:
        crashed = client.create_flow_run(finetune, name="crashed-run", state=Crashed())
        running = client.create_flow_run(finetune, name="running-run", state=Running())
    run_ids = {
        name: tracking.start_pipeline_run(cfg, name, tags={tracking.FLOW_RUN_TAG: str(flow_run_id)})
        for name, flow_run_id in [("crashed", crashed.id), ("running", running.id), ("unknown", uuid4())]
    }

    closing = flow(name="closing")(close_abandoned_runs).with_options(flow_run_name="closing-run")
    closing(cfg)

    runs = {name: mlflow.MlflowClient(uri).get_run(run_id) for name, run_id in run_ids.items()}
    assert runs["crashed"].info.status == "KILLED"
    reason = runs["crashed"].data.tags[tracking.CLOSED_REASON_TAG]
    assert (
        reason.startswith(f"flow run {crashed.id} (crashed-run) ended Crashed")
        and "closed by flow run" in reason
    )
    assert runs["running"].info.status == "RUNNING" and runs["unknown"].info.status == "RUNNING"


def test_iou_table_rows_in_percent() -> None:
    baseline = {"miou": 0.1, "per_class_iou": {"road": 0.5, "sidewalk": 0.0, "train": float("nan")}}
    finetuned = {"miou": 0.4567, "per_class_iou": {"road": 0.91234, "sidewalk": 0.25, "train": float("nan")}}
    rows = iou_table(baseline, finetuned)
    assert rows == [
        {"class": "road", "baseline": 50.0, "finetuned": 91.23, "delta": 41.23},
        {"class": "sidewalk", "baseline": 0.0, "finetuned": 25.0, "delta": 25.0},
        {"class": "train", "baseline": None, "finetuned": None, "delta": None},
        {"class": "mIoU", "baseline": 10.0, "finetuned": 45.67, "delta": 35.67},
    ]
    assert not any(isinstance(v, float) and math.isnan(v) for row in rows for v in row.values())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_flow_cli_makes_one_parent_mlflow_run_and_prints_no_error(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [
        *_tiny_data(tmp_path / "data"),
        f"run_dir={tmp_path / 'run'}",
        f"train.output_dir={tmp_path / 'run' / 'train'}",
        f"tracking.tracking_uri={uri}",
        "tracking.system_metrics=false",
        "data.num_workers=0",
        "augment.crop=[64, 128]",
        "train.epochs=1",
        "train.global_batch_size=2",
        "export.parity_sizes=[[64, 128], [32, 64]]",
        "export.parity_images=1",
        "evaluate.num_overlays=1",
    ]
    # As `make demo` runs it: no Prefect server configured, so the CLI starts a temporary one.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    result = subprocess.run(
        [sys.executable, "-m", "flows.finetune", "--recipe", "demo", *overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=540, check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Registered cityscapes-deeplabv3 version 1" in result.stdout
    noise = [line for line in output.splitlines() if "Traceback" in line or re.search(r"\bERROR\b", line)]
    assert not noise, output

    # One parent run per pipeline run; the stages' runs are its children and record the dataset.
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("cityscapes-deeplabv3")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert parent.info.run_name == "demo-mobilenet_v3_large" and parent.info.status == "FINISHED"
    children = {
        run.info.run_name: run
        for run in runs
        if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(children) == {"baseline-paper-baseline", "train-demo-mobilenet_v3_large", "finetuned"}
    assert len(runs) == 4
    assert parent.data.metrics["finetuned_val_miou"] == children["finetuned"].data.metrics["val_miou"]
    assert (
        parent.data.metrics["baseline_val_miou"]
        == children["baseline-paper-baseline"].data.metrics["val_miou"]
    )
    fingerprint = dataset_fingerprint(tmp_path / "data")
    for run, context in [
        (parent, "pipeline"),
        (children["baseline-paper-baseline"], "evaluation"),
        (children["finetuned"], "evaluation"),
    ]:
        (recorded,) = run.inputs.dataset_inputs
        assert recorded.dataset.digest == fingerprint[:32]
        assert {tag.key: tag.value for tag in recorded.tags}["mlflow.data.context"] == context
