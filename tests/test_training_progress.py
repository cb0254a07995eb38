"""Rank 0's progress records: the line format, its relay to ``on_epoch``, and real torchrun runs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from components.launch import launch_training
from components.train_contract import EpochProgress, relay_progress
from tests.test_train import one_thread, tiny_config  # noqa: F401  (one_thread is a fixture)

RANK0_PREFIX = "2026-12-05 11:00:00,123 INFO [rank 0] components.train: "


def test_a_record_reads_back_from_a_line_of_rank0s_output() -> None:
    record = EpochProgress(
        3, 8, train_loss=0.41, lr=0.0012, images_per_second=45.5, val_miou=0.6, eta_s=720.0
    )
    assert EpochProgress.from_line(RANK0_PREFIX + record.to_line()) == record
    start = EpochProgress(5, 8)  # a resume's first record: no metrics yet
    assert EpochProgress.from_line(RANK0_PREFIX + start.to_line()) == start


@pytest.mark.parametrize(
    "line",
    [
        "",
        RANK0_PREFIX + "epoch 1/2 step 2/2 loss 0.9000 lr 0.01 8.0 img/s ETA 0:00:02",
        RANK0_PREFIX + 'cityseg-progress {"epoch": 1, "epochs"',  # cut off
        RANK0_PREFIX + 'cityseg-progress {"epoch": 1, "epochs": 2, "loss_scale": 3}',  # unknown field
        RANK0_PREFIX + "cityseg-progress [1, 2]",
        RANK0_PREFIX + 'cityseg-progress {"epoch": 1}',  # missing field
    ],
)
def test_other_lines_are_no_records(line: str) -> None:
    assert EpochProgress.from_line(line) is None


def test_records_go_to_on_epoch_and_a_failing_reporter_does_not_stop_the_relay(
    caplog: pytest.LogCaptureFixture,
) -> None:
    received: list[EpochProgress] = []
    line = (
        RANK0_PREFIX
        + EpochProgress(1, 2, train_loss=0.5, lr=0.01, images_per_second=9.0, eta_s=3.0).to_line()
    )
    assert relay_progress(line, received.append)
    assert received == [EpochProgress.from_line(line)]
    assert not relay_progress(
        RANK0_PREFIX + "epoch 1/2: val mIoU 0.1000 (best 0.1000, epoch 1)", received.append
    )
    assert len(received) == 1
    assert relay_progress(line, None)  # nobody listening: still not a line for the log

    def unreachable_api(_progress: EpochProgress) -> None:
        raise ConnectionError("Prefect API unreachable")

    with caplog.at_level(logging.WARNING, logger="components.launch"):
        assert relay_progress(line, unreachable_api)
    assert "reporting the progress after epoch 1 failed: Prefect API unreachable" in caplog.text


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_torchrun_reports_every_epoch_and_a_resume_starts_at_its_epoch(
    synthetic_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tiny_config(synthetic_root, tmp_path, "train.epochs=2", "train.val_every=2")
    received: list[EpochProgress] = []
    with caplog.at_level(logging.INFO, logger="components.launch"):
        launch_training(cfg, on_epoch=received.append)
    start, first, second = received
    assert start == EpochProgress(0, 2)
    assert (first.epoch, second.epoch) == (1, 2) and first.epochs == second.epochs == 2
    for record in (first, second):
        assert record.train_loss > 0 and record.images_per_second > 0
    assert first.lr > second.lr >= 0  # the schedule decays to 0 at the last step
    assert first.val_miou is None and 0 <= second.val_miou <= 1  # validated only after epoch 2
    assert first.eta_s > 0 and second.eta_s == 0
    relayed = [r.getMessage() for r in caplog.records if r.name == "components.launch"]
    assert any("epoch 2/2 step" in line and "img/s" in line and "ETA" in line for line in relayed)
    assert not [line for line in relayed if "cityseg-progress" in line], "records are not log lines"

    resumed: list[EpochProgress] = []
    launch_training(cfg, on_epoch=resumed.append)  # every epoch done: resumes after epoch 2
    assert resumed == [EpochProgress(2, 2)]
