"""Shared fixtures: one small synthetic Cityscapes dataset per test session, prepared with trainIds."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def prepared_synthetic(root: Path, *, train: int, val: int, height: int, width: int) -> Path:
    """Generate a synthetic Cityscapes (2 cities, seed 0) under ``root`` and write its trainIds."""
    from components.data.synth import generate_synthetic_cityscapes
    from components.data.trainids import create_trainid_labels

    generate_synthetic_cityscapes(root, train=train, val=val, height=height, width=width, cities=2, seed=0)
    create_trainid_labels(root, workers=2, progress=False)
    return root


@pytest.fixture(scope="session", autouse=True)
def temp_files_in_basetemp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Temp files of this process and the servers and jobs it starts go under pytest's base folder,
    which pytest removes after a passing run (``tmp_path_retention_policy``): what a library leaves in
    the temp folder cannot pile up across runs and fill CI's disk."""
    folder = tmp_path_factory.getbasetemp() / "tmp"
    folder.mkdir(exist_ok=True)
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(folder)
    tempfile.tempdir = None  # recomputed from TMPDIR on next use
    yield
    if before is None:
        os.environ.pop("TMPDIR")
    else:
        os.environ["TMPDIR"] = before
    tempfile.tempdir = None


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared synthetic dataset (64x128, 8 train / 4 val images, 2 cities). Treat as read-only."""
    return prepared_synthetic(tmp_path_factory.mktemp("cityscapes"), train=8, val=4, height=64, width=128)


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh moto S3 server; the process environment points boto3 at it with test credentials."""
    from tests.s3server import TEST_CREDENTIALS, moto_server

    with moto_server() as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        for name, value in TEST_CREDENTIALS.items():
            monkeypatch.setenv(name, value)
        yield endpoint
