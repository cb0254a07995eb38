"""Preemption: a run killed (SIGKILL) or stopped (SIGTERM) midway resumes to exactly the same result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from components.checkpoint import load_checkpoint
from components.config import Config
from components.train import INTERRUPTED_EXIT_CODE
from tests.test_train import tiny_config

REPO = Path(__file__).resolve().parent.parent
EPOCHS = 3


def _config(root: Path, tmp_path: Path, name: str) -> Path:
    """Random scale/crop/flip/colour augmentation and dropout stay on: resuming must replay them."""
    cfg = tiny_config(root, tmp_path / name, f"train.epochs={EPOCHS}", "train.log_every=1")
    # One MLflow store for the module's runs (creating a SQLite store costs seconds).
    cfg.tracking.tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = tmp_path / f"{name}.yaml"
    path.write_text(cfg.to_yaml())
    return path


def _start(config: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "components.train", "--config", str(config)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _run(config: Path) -> None:
    process = _start(config)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr[-3000:]


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"training ended before {path.name} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def _final(tmp_path: Path, name: str) -> dict:
    return load_checkpoint(str(tmp_path / name / "train" / f"epoch_{EPOCHS:04d}.pt"))


def _assert_same_training(resumed: dict, reference: dict) -> None:
    assert resumed["epoch"] == reference["epoch"] == EPOCHS
    assert resumed["model"].keys() == reference["model"].keys()
    for name, tensor in reference["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    for key in ("train_loss", "lr", "val_miou", "val_iou_road"):
        assert resumed["metrics"][key] == reference["metrics"][key], key
    assert resumed["best_miou"] == reference["best_miou"]
    assert resumed["optimizer"]["state"].keys() == reference["optimizer"]["state"].keys()
    for index, state in reference["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(
                torch.as_tensor(resumed["optimizer"]["state"][index][key]), torch.as_tensor(value)
            )


@pytest.fixture(scope="module")
def reference(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp_path = tmp_path_factory.mktemp("resume")
    _run(_config(synthetic_root, tmp_path, "uninterrupted"))
    return tmp_path, _final(tmp_path, "uninterrupted")


@pytest.mark.slow
def test_sigkill_after_first_epoch_then_resume(synthetic_root: Path, reference: tuple[Path, dict]) -> None:
    tmp_path, expected = reference
    config = _config(synthetic_root, tmp_path, "killed")
    process = _start(config)
    _wait_for(tmp_path / "killed" / "train" / "epoch_0001.pt.sha256", process)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    checkpoints = tmp_path / "killed" / "train"
    assert not (checkpoints / f"epoch_{EPOCHS:04d}.pt").exists()
    run_id = load_checkpoint(str(checkpoints / "epoch_0001.pt"))["mlflow_run_id"]

    _run(config)

    resumed = _final(tmp_path, "killed")
    _assert_same_training(resumed, expected)
    assert resumed["mlflow_run_id"] == run_id  # the same MLflow run, continued
    client = mlflow.MlflowClient(Config.model_validate(resumed["config"]).resolved_tracking_uri())
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_sigterm_mid_epoch_exits_143_then_resume(synthetic_root: Path, reference: tuple[Path, dict]) -> None:
    tmp_path, expected = reference
    config = _config(synthetic_root, tmp_path, "preempted")
    process = _start(config)
    assert process.stderr is not None
    for line in process.stderr:  # wait until epoch 2 is half done
        if "epoch 2/3 step 1/2" in line:
            break
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == INTERRUPTED_EXIT_CODE, stderr[-3000:]
    assert "SIGTERM during epoch 2" in stderr
    checkpoints = tmp_path / "preempted" / "train"
    assert (checkpoints / "epoch_0001.pt.sha256").exists()
    assert not (checkpoints / "epoch_0002.pt").exists()

    _run(config)

    resumed = _final(tmp_path, "preempted")
    _assert_same_training(resumed, expected)
    client = mlflow.MlflowClient(Config.model_validate(resumed["config"]).resolved_tracking_uri())
    history = client.get_metric_history(resumed["mlflow_run_id"], "val_miou")
    assert [m.step for m in history] == [1, 2, 3]
    assert history[-1].value == expected["metrics"]["val_miou"]
