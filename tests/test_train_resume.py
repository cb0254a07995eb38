"""Preemption: a run killed (SIGKILL) or stopped (SIGTERM) midway resumes to exactly the same result.

The demo recipe runs as shipped (a DataLoader worker, head dropout, warmup + poly LR, random
scale/crop/flip) on frames of its crop's size; only the epochs and the data are smaller.
"""

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
from components.config import Config, load_config
from components.train_contract import INTERRUPTED_EXIT_CODE
from tests.conftest import prepared_synthetic

REPO = Path(__file__).resolve().parent.parent
EPOCHS = 3


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Frames of the demo's crop size (128x256), 8 training images: 2 steps of 4 per epoch."""
    return prepared_synthetic(tmp_path_factory.mktemp("demo-data"), train=8, val=4, height=128, width=256)


def _config(root: Path, tmp_path: Path, name: str) -> Path:
    cfg = load_config(
        "demo",
        [
            f"data.root={root}",
            f"train.epochs={EPOCHS}",
            "train.log_every=1",
            f"train.output_dir={tmp_path / name / 'train'}",
            f"run_dir={tmp_path / name}",
            # One MLflow store for the module's runs (creating a SQLite store costs seconds).
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.system_metrics=false",
        ],
    )
    assert cfg.data.num_workers > 0 and cfg.train.head_dropout and cfg.optimizer.warmup_iters  # as shipped
    path = tmp_path / f"{name}.yaml"
    path.write_text(cfg.to_yaml())
    return path


def _start(config: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "components.train", "--recipe", str(config)],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _run(config: Path) -> None:
    process = _start(config)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"training ended before {path.name} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def _stop_at(process: subprocess.Popen, line: str, signum: int, written: Path | None = None) -> str:
    """Send ``signum`` once the process logs ``line`` (and, if given, once ``written`` exists); returns its
    remaining stderr."""
    assert process.stderr is not None
    for logged in process.stderr:
        if line in logged:
            break
    if written is not None:
        _wait_for(written, process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    return stderr


def _final(tmp_path: Path, name: str) -> dict:
    return load_checkpoint(str(tmp_path / name / "train" / f"epoch_{EPOCHS:04d}.pt"))


def _history(checkpoint: dict) -> dict[str, dict[int, float]]:
    """Every logged metric per epoch (throughput aside: it is timing, not training)."""
    client = mlflow.MlflowClient(Config.model_validate(checkpoint["config"]).resolved_tracking_uri())
    run = client.get_run(checkpoint["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    names = sorted(set(run.data.metrics) - {"images_per_second"})
    histories = {name: client.get_metric_history(run.info.run_id, name) for name in names}
    return {name: {m.step: m.value for m in history} for name, history in histories.items()}


def _assert_same_training(resumed: dict, reference: dict) -> None:
    assert resumed["epoch"] == reference["epoch"] == EPOCHS
    assert resumed["model"].keys() == reference["model"].keys()
    for name, tensor in reference["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    assert resumed["optimizer"]["state"].keys() == reference["optimizer"]["state"].keys()
    for index, state in reference["optimizer"]["state"].items():
        for key, value in state.items():
            resumed_value = resumed["optimizer"]["state"][index][key]
            assert torch.equal(torch.as_tensor(resumed_value), torch.as_tensor(value))
    assert resumed["scheduler"] == reference["scheduler"]
    assert resumed["best_miou"] == reference["best_miou"]
    history, expected = _history(resumed), _history(reference)
    assert list(expected["train_loss"]) == list(range(1, EPOCHS + 1))
    assert list(expected["val_miou"]) == [EPOCHS]  # the demo validates every 5th and the last epoch
    assert history == expected  # every epoch's loss and LR, and the validation metrics, exactly


@pytest.fixture(scope="module")
def reference(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp_path = tmp_path_factory.mktemp("resume")
    _run(_config(demo_root, tmp_path, "uninterrupted"))
    return tmp_path, _final(tmp_path, "uninterrupted")


@pytest.mark.slow
def test_sigkill_after_first_epoch_then_resume(demo_root: Path, reference: tuple[Path, dict]) -> None:
    tmp_path, expected = reference
    config = _config(demo_root, tmp_path, "killed")
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


@pytest.mark.slow
def test_sigterm_then_sigkill_mid_epoch_then_resume(demo_root: Path, reference: tuple[Path, dict]) -> None:
    tmp_path, expected = reference
    config = _config(demo_root, tmp_path, "preempted")
    checkpoints = tmp_path / "preempted" / "train"

    process = _start(config)
    stderr = _stop_at(process, "epoch 2/3 step 1/2", signal.SIGTERM)
    assert process.returncode == INTERRUPTED_EXIT_CODE, stderr[-3000:]
    assert "SIGTERM during epoch 2" in stderr
    assert (checkpoints / "epoch_0001.pt.sha256").exists()
    assert not (checkpoints / "epoch_0002.pt").exists()

    process = _start(config)  # resumes epoch 2, then dies without warning in the middle of epoch 3
    # Checkpoints are written on a background thread: on a loaded machine epoch 2's may still be in flight
    # at epoch 3's first step, and a SIGKILL then loses it by design (the resume starts from epoch 1).
    _stop_at(process, "epoch 3/3 step 1/2", signal.SIGKILL, written=checkpoints / "epoch_0002.pt.sha256")
    assert process.returncode == -signal.SIGKILL
    assert (checkpoints / "epoch_0002.pt.sha256").exists()
    assert not (checkpoints / "epoch_0003.pt").exists()

    _run(config)

    _assert_same_training(_final(tmp_path, "preempted"), expected)
