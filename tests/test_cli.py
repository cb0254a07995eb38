"""Every CLI turns a CitysegError into one line on stderr and exit code 1, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

CASES = [
    ("components.evaluate", ["--baseline", "zero-shot", "--data", "/nonexistent", "model.weights=bogus"]),
    ("components.data", ["validate", "--root", "/nonexistent"]),
    ("components.export", ["--checkpoint", "/nonexistent.pt", "--out", "x.onnx", "--data", "/nonexistent"]),
    ("components.predict", ["--model", "/nonexistent.onnx", "--input", "/nonexistent", "--output", "out"]),
    ("flows.finetune", ["--recipe", "demo", "train.epochs=zero"]),
]


@pytest.mark.parametrize(("module", "args"), CASES, ids=[case[0] for case in CASES])
def test_user_error_is_one_line_and_exit_code_1(module, args, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")
