"""The inference benchmark rows at toy size: the whole predict path vs the eager loop (GPU inference:
tests/test_gpu_check.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.slow
def test_predict_path_rows_against_the_eager_loop(synthetic_root: Path, tmp_path: Path) -> None:
    from bench.inference import bench_predict_path

    options = {"backbone": "mobilenet_v3_large", "frames": 2, "repeats": 1, "exporter": "torchscript"}
    row = bench_predict_path(synthetic_root, tmp_path, **options)
    assert row.unit == "images/s" and row.ours > 0 and row.reference > 0
    assert row.identical is True, row.notes  # argmax agreement >= the export gate's 99.9%
    assert "path fp32" in row.what and "64x128 frames" in row.what and row.target == ""

    int8 = bench_predict_path(synthetic_root, tmp_path, **options, precision="int8")
    assert (tmp_path / "deeplabv3_mobilenet_v3_large_random_meta_torchscript.int8.onnx").is_file()
    assert "path int8" in int8.what and int8.target == ">= 1.5x" and int8.ours > 0
    agreement = float(int8.notes.split("argmax agreement ")[1].split()[0])
    assert agreement >= 0.5  # a random MobileNetV3 predicts nearly one class: int8 may agree everywhere
