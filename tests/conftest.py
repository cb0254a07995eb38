"""Shared fixtures: one small synthetic Cityscapes dataset per test session, prepared with trainIds."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared synthetic dataset (64x128, 8 train / 4 val images, 2 cities). Treat as read-only."""
    from components.data.synth import generate_synthetic_cityscapes
    from components.data.trainids import create_trainid_labels

    root = tmp_path_factory.mktemp("cityscapes")
    generate_synthetic_cityscapes(root, train=8, val=4, height=64, width=128, cities=2, seed=0)
    create_trainid_labels(root, workers=2, progress=False)
    return root
