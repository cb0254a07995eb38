"""Smoke run of the benchmark harness at toy sizes: the rows, the files, and identical results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.run import main

FIELDS = {"what", "unit", "ours", "reference", "ratio", "identical", "target", "met", "notes"}


@pytest.mark.slow
def test_bench_rows_at_toy_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results_json, results_md = tmp_path / "results.json", tmp_path / "RESULTS.md"
    toy = [
        "--train",
        "4",
        "--val",
        "2",
        "--height",
        "64",
        "--repeats",
        "1",
        "--only",
        "input",
        "trainids",
        "evaluation",
        "gpu",
    ]
    files = ["--json", str(results_json), "--results", str(results_md)]
    files += ["--gpu-json", str(tmp_path / "gpu_results.json"), "--work-dir", str(tmp_path / "work")]
    status = main(toy + files)
    assert status == 0
    run = json.loads(results_json.read_text())
    rows = {row["what"].split(" (")[0].split(",")[0]: row for row in run["rows"]}
    assert all(set(row) == FIELDS for row in run["rows"])
    assert len(run["rows"]) == 5

    measured = [row for row in run["rows"] if not row["what"].startswith("GPU")]
    for row in measured:
        assert row["identical"] is True, row
        assert row["ours"] > 0 and row["reference"] > 0
        assert row["ratio"] == row["ours"] / row["reference"]  # the same division; JSON keeps floats exactly
        assert row["met"] in (True, False) if row["target"] else row["met"] is None
    assert "max |IoU diff| 0.0e+00" in rows["evaluation"]["notes"]
    assert "36 annotations" in rows["trainId labels"]["notes"]

    if not torch.cuda.is_available():
        gpu = rows["GPU training"]
        assert gpu["notes"] == "not run: no GPU lent" and gpu["ours"] is None and gpu["identical"] is None
        assert not (tmp_path / "gpu_results.json").exists()

    markdown = results_md.read_text()
    assert "| what | ours | reference |" in markdown and run["commit"] in markdown
    assert "input pipeline, paper recipe (per core)" in markdown
    assert "images/s" in capsys.readouterr().out


@pytest.mark.slow
def test_gpu_training_bench_runs_the_real_train_step_on_cpu(tmp_path: Path) -> None:
    """The GPU benchmark's code path at toy size on CPU, so that a crash in it fails CI."""
    from bench.gpu_training import bench_gpu_training
    from tests.conftest import prepared_synthetic

    root = prepared_synthetic(tmp_path / "data", train=4, val=1, height=64, width=128)
    tiny = ("model.backbone=mobilenet_v3_large", "augment.resize=[64, 128]", "train.global_batch_size=2")
    rows = bench_gpu_training(root, steps=1, warmup=1, device="cpu", overrides=tiny)

    # ours vs the paper setup, end to end and step only (cuDNN autotuning is CUDA's alone).
    assert [row.what.rsplit(", ", 1)[1] for row in rows] == [
        "end to end (ours vs paper setup)",
        "step only (ours vs paper setup)",
    ]
    assert all(row.ours > 0 and row.reference > 0 for row in rows)
    assert all("micro-batch 2 vs 2" in row.notes for row in rows)
