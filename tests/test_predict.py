"""Downstream inference from a local ONNX file: outputs, input validation, tiling of large images."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.test_export import shared_export


@pytest.fixture
def onnx_file(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path) -> str:
    return shared_export(tmp_path_factory, synthetic_root)[1].onnx_path


@pytest.fixture
def images(tmp_path: Path, synthetic_root: Path) -> Path:
    folder = tmp_path / "images"
    for path in sorted((synthetic_root / "leftImg8bit" / "val").rglob("*.png"))[:2]:
        (folder / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / path.parent.name / path.name)
    return folder


@pytest.mark.slow
def test_predict_writes_trainids_labelids_and_overlays(onnx_file: str, images: Path, tmp_path: Path) -> None:
    from components.labels import TRAIN_ID_TO_LABEL_ID
    from components.predict import predict
    from components.serving import Segmenter

    out = tmp_path / "out"
    written = predict(onnx_file, str(images), str(out), batch_size=2, progress=False)
    sources = sorted(images.rglob("*.png"))
    assert written == [out / "trainIds" / p.relative_to(images) for p in sources]
    rgb = np.stack([cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in sources])
    expected = Segmenter(onnx_file).masks(rgb)
    for i, path in enumerate(sources):
        relative = path.relative_to(images)
        train_ids = cv2.imread(str(out / "trainIds" / relative), cv2.IMREAD_UNCHANGED)
        label_ids = cv2.imread(str(out / "labelIds" / relative), cv2.IMREAD_UNCHANGED)
        overlay = cv2.imread(str(out / "overlay" / relative), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(train_ids, expected[i])
        np.testing.assert_array_equal(label_ids, np.asarray(TRAIN_ID_TO_LABEL_ID, dtype=np.uint8)[train_ids])
        assert overlay.shape == (64, 128, 3)


@pytest.mark.slow
def test_large_images_are_tiled_or_resized(onnx_file: str, images: Path, tmp_path: Path) -> None:
    from components.predict import predict
    from components.serving import Segmenter

    source = sorted(images.rglob("*.png"))[0]
    rgb = cv2.cvtColor(cv2.imread(str(source)), cv2.COLOR_BGR2RGB)
    whole = Segmenter(onnx_file).masks(rgb[None])[0]
    for large in ("tile", "resize"):
        out = tmp_path / large
        (written,) = predict(onnx_file, str(source), str(out), max_side=48, large=large, progress=False)
        mask = cv2.imread(str(written), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (64, 128)
        # Windows/downscaling see less context than the whole image, but most pixels agree.
        assert (mask == whole).mean() > 0.5, large


def test_bad_inputs_are_refused_before_anything_is_written(
    onnx_file: str, images: Path, tmp_path: Path
) -> None:
    from components.errors import DataError
    from components.predict import predict

    (images / "notes.txt").write_text("not an image")
    cv2.imwrite(str(images / "gray.png"), np.zeros((8, 8), np.uint8))
    cv2.imwrite(str(images / "deep.png"), np.zeros((8, 8, 3), np.uint16))
    out = tmp_path / "out"
    with pytest.raises(DataError, match="3 input file") as error:
        predict(onnx_file, str(images), str(out), progress=False)
    message = str(error.value)
    assert "notes.txt: not an image" in message
    assert "gray.png: L image" in message
    assert "deep.png: 16-bit PNG" in message
    assert not out.exists()


def test_missing_model_is_a_model_error(tmp_path: Path) -> None:
    from components.errors import ModelError
    from components.predict import resolve_onnx

    with pytest.raises(ModelError, match=r"neither a models:/ URI nor an existing \.onnx file"):
        resolve_onnx(str(tmp_path / "missing.onnx"))
