"""Bad input refused with a clear error that names it, and nothing written. The other refusals live next to
their components: data layout (test_data_dataset), config (test_config), world size (test_train_ddp),
checkpoint mismatches (test_model), parity gate (test_export), non-image/grayscale/16-bit inputs
(test_predict)."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_export import shared_export


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A SQLite registry holding model ``seg`` with version 1 as @champion and version 2 as @challenger."""
    import mlflow

    folder = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        client = mlflow.MlflowClient()
        client.create_registered_model("seg")
        for version, alias in (("1", "champion"), ("2", "challenger")):
            client.create_model_version("seg", source=str(folder / f"model-{version}"))
            client.set_registered_model_alias("seg", alias, version)
        yield uri


@pytest.mark.parametrize("load", ["load_model", "resolve_onnx"])
def test_unknown_alias_is_named_and_the_existing_ones_listed(
    registry: str, load: str, tmp_path: Path
) -> None:
    from components.errors import ModelError
    from components.model import load_model
    from components.predict import resolve_onnx

    cache = tmp_path / "cache"
    call = load_model if load == "load_model" else lambda uri: resolve_onnx(uri, str(cache))
    with pytest.raises(ModelError) as error:
        call("models:/seg@production")
    message = str(error.value)
    assert "models:/seg@production" in message and registry in message
    assert "Aliases of seg: @challenger (version 2), @champion (version 1)" in message

    with pytest.raises(ModelError, match=r"models:/segmenter@champion.*Registered models: seg\."):
        call("models:/segmenter@champion")
    assert not cache.exists(), "nothing may be cached for a model that does not resolve"


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels (the pixel data is a few bytes: never decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(16)))
        + chunk(b"IEND", b"")
    )


def test_huge_images_are_refused_before_decoding(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path
) -> None:
    from components.errors import DataError
    from components.predict import MAX_PIXELS, predict

    onnx_file = shared_export(tmp_path_factory, synthetic_root)[1].onnx_path
    images = tmp_path / "images"
    images.mkdir()
    (images / "big.png").write_bytes(_png_header(9000, 5000))  # 45 MP: over our limit, under Pillow's
    (images / "bomb.png").write_bytes(_png_header(30000, 30000))  # 900 MP: Pillow's bomb error
    out = tmp_path / "out"
    with pytest.raises(DataError, match="2 input file") as error:
        predict(onnx_file, str(images), str(out), progress=False)
    message = str(error.value)
    assert f"big.png: 9000x5000 pixels; split or downscale it (limit: {MAX_PIXELS} pixels" in message
    assert "bomb.png: too large for Pillow's decompression-bomb limit" in message
    assert not out.exists()
