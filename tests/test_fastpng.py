"""The fast label PNG reader returns exactly what OpenCV's ``imread(IMREAD_UNCHANGED)`` returns."""

from __future__ import annotations

import itertools
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from components.data.fastpng import decode_gray8, imread_unchanged
from components.data.layout import PNG_SIGNATURE


def _label_map(rng: np.random.Generator, height: int = 37, width: int = 53) -> np.ndarray:
    """Blocks of classes and ignore, like a prediction, plus some per-pixel noise."""
    ids = np.zeros((height, width), np.uint8)
    for _ in range(12):
        y, x = rng.integers(0, height), rng.integers(0, width)
        ids[y : y + rng.integers(1, height), x : x + rng.integers(1, width)] = rng.choice([*range(19), 255])
    noise = rng.random(ids.shape) < 0.05
    ids[noise] = rng.integers(0, 256, int(noise.sum()))
    return ids


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _encode(
    ids: np.ndarray, filters: list[int], idat_parts: int = 1, *, interlace: int = 0, width: int = 0
) -> bytes:
    """A greyscale PNG whose row i uses filter ``filters[i]`` (0 None, 1 Sub, 2 Up), split over IDATs;
    ``width`` overrides the header's (a file whose rows are shorter than it says)."""
    height, width = ids.shape[0], width or ids.shape[1]
    wide = ids.astype(np.int16)
    rows = []
    for index, kind in enumerate(filters):
        row = wide[index]
        if kind == 1:
            row = row - np.concatenate([[0], row[:-1]])
        elif kind == 2:
            row = row - (wide[index - 1] if index else 0)
        rows.append(bytes([kind]) + (row % 256).astype(np.uint8).tobytes())
    stream = zlib.compress(b"".join(rows), 6)
    cut = np.linspace(0, len(stream), idat_parts + 1).astype(int)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, interlace)
    parts = [_chunk(b"IDAT", stream[a:b]) for a, b in itertools.pairwise(cut)]
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + b"".join(parts) + _chunk(b"IEND", b"")


def _same_as_opencv(path: Path) -> np.ndarray | None:
    ours, theirs = imread_unchanged(path), cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if theirs is None:
        assert ours is None
    else:
        assert ours is not None and ours.dtype == theirs.dtype and np.array_equal(ours, theirs)
    return ours


@pytest.mark.parametrize("seed", range(4))
def test_none_sub_and_up_rows_decode_on_the_fast_path(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    ids = _label_map(rng)
    # Runs of each filter and single rows between them; an Up run at the top adds to a zero row.
    filters = rng.choice([0, 1, 2], ids.shape[0]).tolist()
    filters[:3] = [2, 2, 1]
    data = _encode(ids, filters, idat_parts=1 + seed)
    assert np.array_equal(decode_gray8(data), ids)
    (tmp_path / "ids.png").write_bytes(data)
    assert np.array_equal(_same_as_opencv(tmp_path / "ids.png"), ids)


def test_files_from_opencv_and_pillow_match_opencv(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for index in range(6):
        ids = _label_map(rng, 40 + index, 70 - index)
        cv2.imwrite(str(tmp_path / f"cv2_{index}.png"), ids)  # every row Sub: the fast path
        assert decode_gray8((tmp_path / f"cv2_{index}.png").read_bytes()) is not None
        Image.fromarray(ids).save(tmp_path / f"pil_{index}.png")  # adaptive filters, Paeth included
    for path in sorted(tmp_path.glob("*.png")):
        assert np.array_equal(_same_as_opencv(path), cv2.imread(str(path), cv2.IMREAD_UNCHANGED))


def test_other_formats_and_damaged_files_get_opencvs_answer(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    ids = _label_map(rng)
    Image.fromarray(ids).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(ids.astype(np.uint16) * 200).save(tmp_path / "sixteen.png")
    cv2.imwrite(str(tmp_path / "rgb.png"), np.dstack([ids, ids, ids]))
    Image.fromarray(ids).save(tmp_path / "transparent.png", transparency=0)
    good = _encode(ids, [1] * ids.shape[0])
    idat = good.index(b"IDAT")
    crc_at = idat + 4 + struct.unpack(">I", good[idat - 4 : idat])[0]  # intact data, wrong checksum
    damaged = {
        "bad_crc.png": good[:crc_at] + bytes([good[crc_at] ^ 0xFF]) + good[crc_at + 1 :],
        "bad_data.png": good[: idat + 6] + bytes([good[idat + 6] ^ 0xFF]) + good[idat + 7 :],
        "cut_off.png": good[: len(good) // 2],
        "not_a_png.png": b"GIF89a" + good[6:],
        "short_rows.png": _encode(ids, [1] * ids.shape[0], width=ids.shape[1] + 1),
    }
    for name, data in damaged.items():
        (tmp_path / name).write_bytes(data)
    for path in sorted(tmp_path.glob("*.png")):
        assert decode_gray8(path.read_bytes()) is None, path.name
        _same_as_opencv(path)
    assert imread_unchanged(tmp_path / "rgb.png").shape == (*ids.shape, 3)
    assert imread_unchanged(tmp_path / "cut_off.png") is None
    # An interlaced header is left to OpenCV (its pixel data would be in Adam7 passes).
    assert decode_gray8(_encode(ids, [1] * ids.shape[0], interlace=1)) is None


def test_scratch_reuses_one_buffer_per_thread(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    maps = [_label_map(rng, 64, 96) for _ in range(24)]
    for index, ids in enumerate(maps):
        cv2.imwrite(str(tmp_path / f"{index:02d}.png"), ids)
    first = imread_unchanged(tmp_path / "00.png", scratch=True)
    assert np.array_equal(first, maps[0])
    second = imread_unchanged(tmp_path / "01.png", scratch=True)
    assert np.shares_memory(first, second) and np.array_equal(first, maps[1])
    assert not np.shares_memory(imread_unchanged(tmp_path / "02.png"), second)

    def check(index: int) -> bool:
        return np.array_equal(imread_unchanged(tmp_path / f"{index:02d}.png", scratch=True), maps[index])

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(check, list(range(len(maps))) * 4))
