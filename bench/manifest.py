"""Manifest writes: the append-only records (``components.predict.ManifestWriter``) vs the baseline, the code
before #23, which rewrote the whole manifest after every batch (O(N^2) bytes for N inputs).

    python -m bench.manifest [--records 20000] [--batch 4]

Both write the same records, shaped like a fleet run's, in batches: to a local folder and to S3 (moto's
server, started in this process). Bytes written are measured: on S3 the Content-Length of every PutObject
request (a botocore ``before-send`` hook), locally what each side wrote. The baseline is quadratic: it runs
at the largest N whose predicted time (seconds per batch and per byte, fitted to its runs of 1,000 and
2,000 records) fits 80% of ``--budget`` seconds, append-only beside it; at ``--records`` only append-only
runs and the baseline's bytes are computed (the sum over batches of the manifest's size). The section
lands in ``bench/RESULTS.md`` before the GPU section; ``python -m bench.run`` puts the same rows in its table.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import datetime
import hashlib
import json
import logging
import os
import shlex
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from bench.common import Row, machine, make_row, source_commit
from components import storage
from components.predict.manifest import (
    MANIFEST,
    OK,
    ManifestWriter,
    ModelId,
    merge_manifests,
    model_fields,
    read_manifest,
    status_counts,
)

BENCH_DIR = Path(__file__).parent
HEADING = "## Manifest writes"
CALIBRATION = (1000, 2000)
"""Records the baseline writes first, to fit its seconds per batch and per byte."""
MARGIN = 0.8
"""The baseline's timed run aims at this share of ``--budget``."""
Writer = Callable[[str, list[dict[str, Any]], int], int]


def manifest_records(count: int) -> list[dict[str, Any]]:
    """``count`` records like those of a fleet run: S3 input and outputs, 2048x1024 frames, sha256, size."""
    model = model_fields(ModelId("cityscapes-deeplabv3", "7", "fp32"))
    records = []
    for i in range(count):
        relative = f"2026-12-01/vehicle-{i % 97:04d}/front/frame_{i:07d}"
        outputs = {
            folder: f"s3://fleet-segmentation/champion-v7/{folder}/{relative}.png"
            for folder in ("trainIds", "labelIds", "overlay")
        }
        records.append(
            {
                "input": f"s3://fleet-frames/{relative}.jpg",
                "outputs": outputs,
                "status": OK,
                "width": 2048,
                "height": 1024,
                "exif_orientation": 1,
                "provider": "CUDAExecutionProvider",
                "input_sha256": hashlib.sha256(relative.encode()).hexdigest(),
                "input_bytes": 400_000 + i * 7919 % 300_000,
                **model,
            }
        )
    return records


def rewrite_after_every_batch(output: str, records: list[dict[str, Any]], batch: int) -> int:
    """The baseline (``segment_inputs`` before #23): after every batch, write the whole manifest again,
    one sorted JSON line per input done so far. Returns the bytes written."""
    uri, done, written = storage.join(output, MANIFEST), {}, 0
    for first in range(0, len(records), batch):
        done.update((record["input"], record) for record in records[first : first + batch])
        text = "".join(json.dumps(done[key], sort_keys=True) + "\n" for key in sorted(done)).encode()
        storage.write_bytes(uri, text)
        written += len(text)
    return written


def append_after_every_batch(output: str, records: list[dict[str, Any]], batch: int) -> int:
    """Ours: each batch appended by a ManifestWriter (shard 0). Returns the bytes written."""
    writer = ManifestWriter(output)
    for first in range(0, len(records), batch):
        writer.append(records[first : first + batch])
    return writer.bytes_written


def records_bytes(records: list[dict[str, Any]]) -> int:
    """The size of the records as manifest lines: what writing each once costs."""
    return sum(len(json.dumps(record, sort_keys=True)) + 1 for record in records)


def rewrite_totals(records: list[dict[str, Any]], batch: int) -> list[int]:
    """The baseline's bytes, computed: after k batches, the sum over those batches of the manifest's size
    after each (the last item covers all the records)."""
    totals, size = [], 0
    for first in range(0, len(records), batch):
        size += records_bytes(records[first : first + batch])
        totals.append((totals[-1] if totals else 0) + size)
    return totals


@dataclass
class Written:
    seconds: float
    bytes: int
    """Measured: PutObject bodies on S3, what the writer wrote locally."""


def timed(write: Writer, output: str, records: list[dict[str, Any]], batch: int) -> Written:
    """Run one side; on S3 the bytes are counted from the PutObject requests, not taken from the writer."""
    with _put_bytes(storage.is_s3(output)) as puts:
        started = time.perf_counter()
        reported = write(output, records, batch)
        seconds = time.perf_counter() - started
    return Written(seconds, sum(puts) if storage.is_s3(output) else reported)


def bench_manifest(
    work_dir: Path, *, records: int = 20_000, batch: int = 4, budget_s: float = 60.0
) -> list[Row]:
    """Two rows per store (local folder, S3 on moto): time and bytes side by side at the baseline's
    affordable N, and bytes at ``records`` (append-only measured, the baseline's computed)."""
    work_dir = Path(work_dir)
    shutil.rmtree(work_dir, ignore_errors=True)
    every = manifest_records(records)
    rows = []
    with _moto_bucket() as bucket:
        for where, root in (("local folder", str(work_dir)), ("S3 (moto in process)", bucket)):
            rows += _store_rows(where, root, every, batch, budget_s)
    shutil.rmtree(work_dir, ignore_errors=True)
    return rows


def _store_rows(
    where: str, root: str, records: list[dict[str, Any]], batch: int, budget_s: float
) -> list[Row]:
    def run(write: Writer, name: str, part: list[dict[str, Any]]) -> tuple[Written, str]:
        output = storage.join(root, name)
        return timed(write, output, part, batch), output

    totals = rewrite_totals(records, batch)
    sizes = [min(k, len(records)) for k in CALIBRATION]
    calibration = [run(rewrite_after_every_batch, f"calibration-{k}", records[:k])[0] for k in sizes]
    predicted = _predicted_seconds(calibration, [-(-k // batch) for k in sizes], totals)
    # The largest N (whole batches, at least one) whose predicted time fits the budget with a margin: on a
    # shared 2-core machine the prediction missed by up to a quarter.
    n = min(len(records), batch * max(1, bisect.bisect_right(predicted, MARGIN * budget_s)))
    reference, reference_out = run(rewrite_after_every_batch, f"rewrite-{n}", records[:n])
    ours, ours_out = run(append_after_every_batch, f"append-{n}", records[:n])
    expected = {record["input"]: record for record in records[:n]}
    identical = read_manifest(reference_out) == read_manifest(ours_out) == expected
    batches = -(-n // batch)
    computed = totals[batches - 1]
    side_by_side = make_row(
        f"manifest writes, {where}, {n:,} records in batches of {batch} "
        "(append-only vs rewrite after every batch)",
        "s",
        ours.seconds,
        reference.seconds,
        identical,
        notes=f"bytes written {ours.bytes:,} vs {reference.bytes:,} (measured; the rewrite's computed sum "
        f"{computed:,} {'matches' if computed == reference.bytes else 'DIFFERS'}); one run each; the "
        f"rewrite's predicted time {predicted[batches - 1]:.0f} s",
    )
    full, full_out = run(append_after_every_batch, f"append-{len(records)}", records)
    started = time.perf_counter()
    counts = status_counts(merge_manifests(full_out))
    merge_s = time.perf_counter() - started
    merged = read_manifest(full_out, shards=[]) == {record["input"]: record for record in records}
    all_bytes, linear = totals[-1], records_bytes(records)
    ran = "measured above" if n == len(records) else "not run at this size"
    notes = [
        f"append-only {full.bytes:,} B in {full.seconds:.1f} s "
        f"({'=' if full.bytes == linear else 'vs'} the records' size {linear:,} B)",
        f"rewrite {ran}: {all_bytes:,} B computed (sum over {len(totals):,} batches of the manifest's size), "
        f"~{predicted[-1]:.0f} s predicted by its calibration",
        f"merge into {MANIFEST} {merge_s:.1f} s ({counts.get(OK, 0):,} ok; identical: the merged manifest "
        "holds exactly the records written)",
    ]
    at_scale = make_row(
        f"manifest bytes, {where}, {len(records):,} records in batches of {batch} "
        "(append-only measured vs rewrite computed)",
        "MB",
        full.bytes / 1e6,
        all_bytes / 1e6,
        merged,
        notes="; ".join(notes),
    )
    return [side_by_side, at_scale]


def _predicted_seconds(runs: list[Written], batches: list[int], totals: list[int]) -> list[float]:
    """The baseline's predicted seconds after 1, 2, ... batches: a per-write cost plus a per-byte cost,
    fitted exactly to two calibration runs (a cost the noise makes negative counts as zero)."""
    (t1, t2), (b1, b2), (s1, s2) = [r.seconds for r in runs], batches, [r.bytes for r in runs]
    determinant = b1 * s2 - b2 * s1
    per_write = max(0.0, (t1 * s2 - t2 * s1) / determinant) if determinant else 0.0
    per_byte = max(0.0, (b1 * t2 - b2 * t1) / determinant) if determinant else 0.0
    if per_write == per_byte == 0.0:  # one size only (a toy run), or noise: all per byte
        per_byte = t2 / s2
    return [per_write * (k + 1) + per_byte * total for k, total in enumerate(totals)]


@contextlib.contextmanager
def _put_bytes(s3: bool) -> Iterator[list[int]]:
    """Collect the Content-Length of every PutObject request sent through ``storage.s3_client()``."""
    sizes: list[int] = []
    if not s3:
        yield sizes
        return

    def count(request: Any, **_: Any) -> None:
        sizes.append(int(request.headers["Content-Length"]))

    events = storage.s3_client().meta.events
    events.register("before-send.s3.PutObject", count)
    try:
        yield sizes
    finally:
        events.unregister("before-send.s3.PutObject", count)


@contextlib.contextmanager
def _moto_bucket() -> Iterator[str]:
    """moto's S3 server on a free loopback port in this process, a bucket on it and the environment
    pointed at it; yields ``s3://bucket/<run>``."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    settings = {
        "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    try:
        with mock.patch.dict(os.environ, settings):
            storage.s3_client().create_bucket(Bucket="bench-manifest")
            yield f"s3://bench-manifest/{uuid.uuid4().hex[:8]}"
    finally:
        server.stop()


def append_section(results: Path, section: str) -> None:
    """Put ``section`` into ``results`` before the GPU section (which ``make gpu-check`` rewrites to the
    end of the file), replacing this bench's earlier section there."""
    from bench.run import GPU_HEADING, _write

    text = results.read_text() if results.is_file() else "# Benchmark results\n"
    head, found, rest = text.partition(HEADING)
    if found:
        following = rest.find("\n## ")
        text = head + (rest[following + 1 :] if following >= 0 else "")
    before, gpu, after = text.partition(GPU_HEADING)
    _write(results, before.rstrip() + "\n\n" + section + ("\n" + gpu + after if gpu else ""))


def main(argv: list[str] | None = None) -> int:
    from bench.run import _context, table

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds for the baseline's timed run")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench/manifest"), help="scratch")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "RESULTS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    context = machine()
    started = time.perf_counter()
    rows = bench_manifest(args.work_dir, records=args.records, batch=args.batch, budget_s=args.budget)
    run = {
        "command": shlex.join(["python", "-m", "bench.manifest", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": source_commit(),
        "machine": context,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(time.perf_counter() - started, 1),
    }
    rows_table = table([row.to_dict() for row in rows])
    intro = (
        "Written by `python -m bench.manifest` (issue #23): the append-only manifest records vs the "
        "baseline, the code before #23 that rewrote the whole manifest after every batch. Bytes are "
        "measured (S3: PutObject Content-Length) except where a row says computed."
    )
    append_section(args.results, "\n\n".join([HEADING, intro, _context(run), rows_table]) + "\n")
    print(rows_table)
    return 1 if any(row.identical is False for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
