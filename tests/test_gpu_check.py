"""``python -m bench.gpu_check`` in its CPU smoke mode: every section runs through the real components at toy
size and the JSON is written (no timing asserted); the budget skips sections; the not-run record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.gpu_check import SECTIONS, main


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke mode is the CPU run; a GPU runs the check")
def test_smoke_runs_every_section_and_writes_its_json(tmp_path: Path) -> None:
    out, results = tmp_path / "gpu.json", tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nthe CPU part\n")
    status = main(["--json", str(out), "--results", str(results), "--work-dir", str(tmp_path / "work")])

    assert status == 0
    run = json.loads(out.read_text())
    assert run["mode"] == "smoke" and run["machine"]["gpu"] is None
    statuses = {name: record["status"] for name, record in run["sections"].items()}
    assert list(statuses) == [name for name, _ in SECTIONS]
    assert statuses.pop("host_sync").startswith("skipped: no CUDA")
    assert set(statuses.values()) == {"ok"}, statuses
    assert all(record["estimate_s"] > 0 for record in run["sections"].values())
    rows = {row["what"]: row for row in run["rows"]}

    training = [row for what, row in rows.items() if what.startswith("GPU training")]
    assert len(training) == 2 and all(row["ours"] > 0 for row in training)  # eager and compiled
    # On CPU a resumed run is bit-exact, and so are two uninterrupted ones.
    (resume,) = [row for what, row in rows.items() if what.startswith("GPU resume")]
    assert resume["ours"] == 0 and resume["reference"] == 0 and resume["met"] is True
    # Two gloo ranks with synchronised BatchNorm equal one process within the measured tolerance.
    (ddp,) = [row for what, row in rows.items() if what.startswith("GPU DDP")]
    assert "world size 2" in ddp["what"] and ddp["met"] is True and ddp["reference"] > 0
    inference = [row for what, row in rows.items() if what.startswith("GPU inference")]
    assert len(inference) == 2 * 5 and all(row["ours"] > 0 for row in inference)
    assert all(row["identical"] for row in inference if "fp32" in row["what"])
    # A smoke run leaves RESULTS.md alone.
    assert results.read_text() == "# Benchmark results\n\nthe CPU part\n"


def test_budget_skips_sections_and_a_not_run_record_fills_the_gpu_section(tmp_path: Path) -> None:
    out, results = tmp_path / "gpu.json", tmp_path / "RESULTS.md"
    status = main(["--smoke", "--budget", "0", "--json", str(out), "--work-dir", str(tmp_path / "work")])
    assert status == 0
    sections = json.loads(out.read_text())["sections"]
    assert all(record["status"].startswith("skipped: budget") for record in sections.values())

    results.write_text("# Benchmark results\n\nthe CPU part\n\n## GPU check\n\nan older record\n")
    reason = "no GPU available (session of 2026-12-05)"
    assert main(["--record-not-run", reason, "--json", str(out), "--results", str(results)]) == 0
    run = json.loads(out.read_text())
    assert run["mode"] == "not run" and all(row["notes"] == f"not run: {reason}" for row in run["rows"])
    markdown = results.read_text()
    assert markdown.startswith("# Benchmark results\n\nthe CPU part\n\n## GPU check\n")
    assert "an older record" not in markdown
    assert markdown.count(f"not run: {reason}") == len(run["rows"]) == 5
    assert ">= 100 images/s (goal 125)" in markdown
