"""``cv2.imread(path, cv2.IMREAD_UNCHANGED)``, ~6x faster for the label maps we score.

libpng spends ~8 ms on a 2048x1024 label PNG: half in zlib's inflate, most of the rest undoing the
row filters one row at a time. For an 8-bit greyscale PNG whose rows use the None, Sub or Up filter
(OpenCV writes every row Sub) this module inflates with zlib-ng (~10x faster than zlib) and undoes each
run of same-filter rows at once as a torch prefix sum (uint8 sums wrap mod 256, as PNG's do): ~1.2 ms.
Anything else -- palette, transparency, interlace, other depths, the sequential Average/Paeth filters
PIL picks for many rows, a bad checksum, a cut-off file -- goes to OpenCV, so the result is OpenCV's.
"""

from __future__ import annotations

import itertools
import struct
import threading
from pathlib import Path

import cv2
import numpy as np
import torch
from zlib_ng import zlib_ng

from components.data.layout import PNG_SIGNATURE

# Above this OpenCV's own limits and error messages apply (and no oversized buffer is guessed here).
_MAX_FAST_PIXELS = 1 << 26
_NONE, _SUB, _UP = 0, 1, 2
_PIECE = 1 << 16  # under malloc's mmap threshold: every piece reuses the same heap memory
_local = threading.local()


def imread_unchanged(path: str | Path, *, scratch: bool = False) -> np.ndarray | None:
    """The file decoded exactly as ``cv2.imread(path, cv2.IMREAD_UNCHANGED)``; None where OpenCV fails.

    ``scratch=True`` may return this thread's reusable buffer, which its next scratch call overwrites:
    for a caller that is done with the pixels before reading the next file (no 2 MB page faults each).
    """
    data = Path(path).read_bytes()
    fast = decode_gray8(data, scratch=scratch)
    if fast is not None:
        return fast
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def decode_gray8(data: bytes, *, scratch: bool = False) -> np.ndarray | None:
    """HxW uint8 for a well-formed non-interlaced 8-bit greyscale PNG with None/Sub/Up rows, else None.

    ``scratch``: as for :func:`imread_unchanged`.
    """
    parsed = _gray8_stream(data)
    if parsed is None:
        return None
    (width, height), stream = parsed
    rows = _inflate(stream, height * (width + 1))
    if rows is None:
        return None
    rows = rows.view(height, width + 1)
    filters = rows[:, 0].numpy()
    if filters.max(initial=0) > _UP:
        return None
    out = _buffer("pixels", height * width) if scratch else torch.empty(height * width, dtype=torch.uint8)
    return _unfilter(rows[:, 1:], filters, out.view(height, width)).numpy()


def _buffer(name: str, size: int) -> torch.Tensor:
    """This thread's reusable uint8 buffer ``name``, at least ``size`` long (its first ``size`` bytes)."""
    buffer = getattr(_local, name, None)
    if buffer is None or buffer.numel() < size:
        buffer = torch.empty(size, dtype=torch.uint8)
        setattr(_local, name, buffer)
    return buffer[:size]


def _inflate(stream: bytes, size: int) -> torch.Tensor | None:
    """The ``size`` inflated bytes in this thread's reusable buffer, or None if the stream is not that.

    Inflating in small pieces into a kept buffer, rather than into one fresh 2 MB ``bytes`` per image,
    spares the page faults of a new mapping every time: they cost as much as the inflating.
    """
    buffer = _buffer("inflated", size).numpy()
    inflater, pending, filled = zlib_ng.decompressobj(), stream, 0
    try:
        while not inflater.eof:
            piece = inflater.decompress(pending, _PIECE)
            if not piece or filled + len(piece) > size:
                return None  # cut off, or more pixels than the header says
            buffer[filled : filled + len(piece)] = np.frombuffer(piece, np.uint8)
            filled += len(piece)
            pending = inflater.unconsumed_tail
    except zlib_ng.error:
        return None
    if filled != size:
        return None
    return torch.from_numpy(buffer)


def _gray8_stream(data: bytes) -> tuple[tuple[int, int], bytes] | None:
    """((width, height), the concatenated IDAT data) when the chunks allow the fast path."""
    if not data.startswith(PNG_SIGNATURE):
        return None
    position, header, idat = len(PNG_SIGNATURE), None, []
    while position + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        body = data[position + 8 : position + 8 + length]
        if len(body) != length:
            return None
        (crc,) = struct.unpack_from(">I", data, position + 8 + length)
        if kind == b"IEND":
            break
        if kind in (b"IHDR", b"IDAT") and zlib_ng.crc32(kind + body) != crc:
            return None
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body) if length == 13 else None
        elif kind == b"IDAT":
            idat.append(body)
        elif kind in (b"PLTE", b"tRNS"):  # colours or transparency: OpenCV returns more channels
            return None
        position += 12 + length
    else:
        return None  # no IEND: cut off
    if header is None or not idat:
        return None
    width, height, depth, colour, compression, filtering, interlace = header
    if (depth, colour, compression, filtering, interlace) != (8, 0, 0, 0, 0):
        return None
    if not 0 < width * height <= _MAX_FAST_PIXELS:
        return None
    return (width, height), b"".join(idat)


def _unfilter(filtered: torch.Tensor, filters: np.ndarray, out: torch.Tensor) -> torch.Tensor:
    """Undo None/Sub/Up row filters into ``out``, one prefix sum per run of rows sharing a filter."""
    height = filtered.shape[0]
    cuts = [0, *(np.flatnonzero(np.diff(filters)) + 1).tolist(), height]
    for start, stop in itertools.pairwise(cuts):
        rows, into = filtered[start:stop], out[start:stop]
        if filters[start] == _NONE:
            into.copy_(rows)
        elif filters[start] == _SUB:  # each byte adds the reconstructed byte to its left
            torch.cumsum(rows, 1, dtype=torch.uint8, out=into)
        else:  # Up: each byte adds the reconstructed byte above it
            torch.cumsum(rows, 0, dtype=torch.uint8, out=into)
            if start:
                into += out[start - 1]
    return out
