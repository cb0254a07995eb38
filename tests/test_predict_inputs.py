"""Awkward inputs for batch inference: each gives one correct output or a named error, never a traceback;
nothing is overwritten, nothing corrupt is segmented, and a rerun resumes from the manifest."""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from tests.test_export import shared_export

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 255, (64, 128, 3), dtype=np.uint8)


@pytest.fixture
def onnx_file(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path) -> str:
    return shared_export(tmp_path_factory, synthetic_root)[1].onnx_path


def _encoded(fmt: str, array: np.ndarray | Image.Image = RGB, **save: object) -> bytes:
    buffer = io.BytesIO()
    (array if isinstance(array, Image.Image) else Image.fromarray(array)).save(buffer, fmt, **save)
    return buffer.getvalue()


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(16)))


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    return _encoded("JPEG", exif=exif.tobytes(), quality=95)


def _flipped(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 64]) + data[middle + 64 :]


GOOD = {
    "city/a/deep/nested.png": _encoded("PNG"),
    "rgba.png": _encoded("PNG", np.dstack([RGB, np.full(RGB.shape[:2], 7, np.uint8)])),
    "rotated.jpg": _exif_rotated_jpeg(),
    "one-pixel.png": _encoded("PNG", RGB[:1, :1]),
    "UPPER.JPG": _encoded("JPEG"),
    "straße mit leerzeichen.webp": _encoded("WEBP", lossless=True),
    "scan.tiff": _encoded("TIFF"),
    "old.bmp": _encoded("BMP"),
    "wide.png": _encoded("PNG", np.tile(RGB, (1, 3, 1))),  # 384 wide > max_side: tiled
}
BAD = {
    "cut-jpeg.jpg": (_encoded("JPEG")[:1500], "truncated or corrupt JPEG (image file is truncated"),
    "cut-png.png": (_encoded("PNG")[:12000], "truncated or corrupt PNG (image file is truncated)"),
    "cut-webp.webp": (_encoded("WEBP", lossless=True)[:3000], "truncated or corrupt WEBP"),
    "cut-tiff.tiff": (_encoded("TIFF")[:12000], "truncated or corrupt TIFF (image file is truncated"),
    "garbled.png": (_flipped(_encoded("PNG")), "truncated or corrupt PNG"),
    "gray.png": (_encoded("PNG", RGB[..., 0]), "L image; convert it to 8-bit RGB"),
    "palette.png": (_encoded("PNG", Image.fromarray(RGB).convert("P")), "P image"),
    "cmyk.jpg": (_encoded("JPEG", Image.fromarray(RGB).convert("CMYK")), "CMYK image"),
    "deep16.png": (cv2.imencode(".png", np.zeros((8, 8, 3), np.uint16))[1].tobytes(), "16-bit PNG"),
    "huge.png": (_png_header(9000, 5000), "9000x5000 pixels; split or downscale it"),
    "empty.jpg": (b"", "not an image"),
    "notes.png": (b"just text, not a PNG", "not an image"),
}


def _write(folder: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


@pytest.fixture
def awkward(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    _write(folder, GOOD)
    _write(folder, {name: data for name, (data, _) in BAD.items()})
    (folder / "gone.png").symlink_to(folder / "deleted-target.png")  # unreadable: a broken link
    _write(folder, {".DS_Store": b"\0", ".cache/x.png": b"\0"})  # hidden: not inputs
    return folder


def _upright(name: str) -> np.ndarray:
    """What the model must see, computed independently of components.predict."""
    with Image.open(io.BytesIO(GOOD[name])) as image:
        rgb = np.asarray(image.convert("RGB"))
    return np.rot90(rgb, k=-1) if name == "rotated.jpg" else rgb


@pytest.mark.slow
def test_awkward_inputs_are_refused_by_name_then_skipped_with_a_manifest(
    onnx_file: str, awkward: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from components.predict import read_manifest, segment_inputs
    from components.predict.__main__ import main
    from components.predict.run import _tiled_mask
    from components.serving import Segmenter

    out = tmp_path / "out"
    code = main(["--model", onnx_file, "--input", str(awkward), "--output", str(out), "--max-side", "256"])
    error = capsys.readouterr().err
    assert code == 1 and "Traceback" not in error
    assert f"{len(BAD) + 1} input file(s) cannot be segmented (nothing was written" in error
    for name, (_, reason) in BAD.items():
        assert f"{awkward / name}: {reason}" in error, name
    assert f"{awkward / 'gone.png'}: cannot be read: missing (a broken link?)" in error
    assert not out.exists()

    summary = segment_inputs(onnx_file, str(awkward), str(out), max_side=256, skip_bad=True, progress=False)
    assert len(summary.segmented) == len(GOOD) and summary.resumed == 0
    assert sorted(summary.failed) == sorted(str(awkward / name) for name in [*BAD, "gone.png"])
    segmenter = Segmenter(onnx_file)
    for name in GOOD:
        relative = str(Path(name).with_suffix(".png"))
        mask = cv2.imread(str(out / "trainIds" / relative), cv2.IMREAD_UNCHANGED)
        upright = _upright(name)
        expected = (
            _tiled_mask(segmenter, upright, 256) if name == "wide.png" else segmenter.masks(upright[None])[0]
        )
        np.testing.assert_array_equal(mask, expected, err_msg=name)
        assert (out / "labelIds" / relative).is_file() and (out / "overlay" / relative).is_file()
    assert mask.shape == (64, 384)  # wide.png, the last: tiled, full size
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == len(GOOD) + len(BAD) + 1  # one line per input, hidden files excluded
    records = read_manifest(str(out))
    rotated = records[str(awkward / "rotated.jpg")]
    assert (rotated["width"], rotated["height"], rotated["exif_orientation"]) == (64, 128, 6)
    assert records[str(awkward / "one-pixel.png")]["width"] == 1
    assert records[str(awkward / "cut-png.png")]["status"] == "failed"
    assert {r["model_version"] for r in manifest} == {summary.model.version}

    # A rerun resumes: nothing done again, nothing rewritten.
    stamp = (out / "trainIds" / "rgba.png").stat().st_mtime_ns
    again = segment_inputs(onnx_file, str(awkward), str(out), max_side=256, skip_bad=True, progress=False)
    assert (len(again.segmented), again.resumed, len(again.failed)) == (0, len(GOOD), len(BAD) + 1)
    assert (out / "trainIds" / "rgba.png").stat().st_mtime_ns == stamp


def test_colliding_output_names_are_refused_before_writing(onnx_file: str, tmp_path: Path) -> None:
    from components.errors import DataError
    from components.predict import predict

    folder = tmp_path / "in"
    _write(folder, {"x.jpg": GOOD["UPPER.JPG"], "x.webp": GOOD["straße mit leerzeichen.webp"], "y.png": b""})
    with pytest.raises(DataError, match="1 output name") as error:
        predict(onnx_file, str(folder), str(tmp_path / "out"), progress=False)
    assert f"x.png <- {folder / 'x.jpg'} and {folder / 'x.webp'}" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_empty_folder_is_a_named_error(onnx_file: str, tmp_path: Path) -> None:
    from components.errors import DataError
    from components.predict import predict

    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    with pytest.raises(DataError, match=f"no input files at {tmp_path / 'empty'}"):
        predict(onnx_file, str(tmp_path / "empty"), str(tmp_path / "out"), progress=False)


@pytest.mark.slow
def test_interrupted_run_resumes_and_a_new_model_version_redoes_everything(
    onnx_file: str, tmp_path: Path
) -> None:
    from components.predict import read_manifest, segment_inputs, write_manifest

    folder = tmp_path / "in"
    _write(folder, {f"frame{i}.png": _encoded("PNG", np.roll(RGB, i, axis=1)) for i in range(5)})
    out = tmp_path / "out"
    first = segment_inputs(onnx_file, str(folder), str(out), batch_size=2, progress=False)
    assert len(first.segmented) == 5
    # An interruption after the first batch: the manifest lists two inputs, outputs of others are absent.
    records = read_manifest(str(out))
    kept = sorted(records)[:2]
    write_manifest(str(out / "manifest.jsonl"), {k: records[k] for k in kept})
    for path in out.rglob("frame[234].png"):
        path.unlink()
    resumed = segment_inputs(onnx_file, str(folder), str(out), batch_size=2, progress=False)
    assert (len(resumed.segmented), resumed.resumed) == (3, 2)
    assert len(read_manifest(str(out))) == 5 and len(list((out / "trainIds").iterdir())) == 5
    # Another model (here: the same graph under another name) is another version: everything is redone.
    other = tmp_path / "other.onnx"
    shutil.copy(onnx_file, other)
    redone = segment_inputs(str(other), str(folder), str(out), overlays=False, progress=False)
    assert (len(redone.segmented), redone.resumed) == (5, 0)
    assert {r["model_name"] for r in read_manifest(str(out)).values()} == {str(other)}


@pytest.mark.slow
def test_each_s3_input_is_fetched_once_and_its_facts_are_recorded(
    onnx_file: str, s3_endpoint: str, tmp_path: Path
) -> None:
    import hashlib

    from components import storage
    from components.predict import read_manifest, segment_inputs

    files = {
        "a.png": _encoded("PNG"),
        "b/c.png": _encoded("PNG", np.roll(RGB, 3, axis=1)),
        "r.jpg": GOOD["rotated.jpg"],
    }
    client = storage.s3_client()
    client.create_bucket(Bucket="frames")
    for name, data in files.items():
        client.put_object(Bucket="frames", Key=f"in/{name}", Body=data)
    fetched: list[str] = []
    client.meta.events.register(
        "before-parameter-build.s3.GetObject", lambda params, **_: fetched.append(params["Key"])
    )
    summary = segment_inputs(onnx_file, "s3://frames/in", str(tmp_path / "out"), batch_size=2, progress=False)
    assert len(summary.segmented) == 3
    assert sorted(fetched) == sorted(f"in/{name}" for name in files), "every object fetched exactly once"

    records = read_manifest(str(tmp_path / "out"))
    for name, data in files.items():
        record = records[f"s3://frames/in/{name}"]
        assert record["input_sha256"] == hashlib.sha256(data).hexdigest()
        assert record["input_bytes"] == len(data)
    rotated = records["s3://frames/in/r.jpg"]
    assert (rotated["input_format"], rotated["exif_orientation"], rotated["width"]) == ("JPEG", 6, 64)
