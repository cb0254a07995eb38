"""Smoke run of the benchmark harness at toy sizes: the rows, the files, and identical results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
    ]
    files = ["--json", str(results_json), "--results", str(results_md)]
    files += ["--gpu-json", str(tmp_path / "gpu_results.json"), "--work-dir", str(tmp_path / "work")]
    status = main(toy + files)
    assert status == 0
    run = json.loads(results_json.read_text())
    rows = {row["what"].split(" (")[0].split(",")[0]: row for row in run["rows"]}
    assert all(set(row) == FIELDS for row in run["rows"])
    assert len(run["rows"]) == 4

    for row in run["rows"]:
        assert row["identical"] is True, row
        assert row["ours"] > 0 and row["reference"] > 0
        assert row["ratio"] == row["ours"] / row["reference"]  # the same division; JSON keeps floats exactly
        assert row["met"] in (True, False) if row["target"] else row["met"] is None
    assert "max |IoU diff| 0.0e+00" in rows["evaluation"]["notes"]
    assert "36 annotations" in rows["trainId labels"]["notes"]

    markdown = results_md.read_text()
    assert "| what | ours | reference |" in markdown and run["commit"] in markdown
    assert "input pipeline, paper recipe (per core)" in markdown
    assert "## GPU check\n" in markdown and "No GPU check recorded." in markdown  # no gpu_results.json there
    assert "images/s" in capsys.readouterr().out
