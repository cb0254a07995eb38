"""Append-only manifest records (issue #23): a rerun resumes from them, the later record wins, two attempts
of one shard never overwrite each other, a torn line costs one input, the merge leaves exactly
``manifest.jsonl``; and the measurement: writing N records costs their size, the old rewrite the quadratic
sum."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from bench.manifest import (
    HEADING,
    append_after_every_batch,
    main,
    manifest_records,
    rewrite_after_every_batch,
    rewrite_totals,
    timed,
)
from components import storage
from components.errors import DataError
from components.predict.manifest import (
    FAILED,
    MANIFEST,
    OK,
    ManifestWriter,
    merge_manifests,
    read_manifest,
    shard_records_name,
    status_counts,
    write_manifest,
)


@pytest.fixture(params=["local", "s3"])
def output(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    request.getfixturevalue("s3_endpoint")
    storage.s3_client().create_bucket(Bucket="predict")
    return "s3://predict/run-1"


def _record(name: str, status: str = OK) -> dict[str, Any]:
    return {"input": name, "status": status, "outputs": {"trainIds": f"trainIds/{name}"}}


def _statuses(records: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {name: record["status"] for name, record in records.items()}


def _size(records: list[dict[str, Any]]) -> int:
    return sum(len(json.dumps(record, sort_keys=True)) + 1 for record in records)


def test_records_survive_a_new_writer_and_the_later_one_wins(output: str) -> None:
    first = ManifestWriter(output, shard=3)
    first.append([_record("a.png"), _record("b.png", FAILED)])
    first.append([_record("c.png")])
    first.append([])  # nothing finished: nothing written
    assert first.bytes_written == _size([_record("a.png"), _record("b.png", FAILED), _record("c.png")])
    # The process dies; the rerun of shard 3 reads what was recorded and redoes b.png.
    assert _statuses(read_manifest(output, shards=[3])) == {"a.png": OK, "b.png": FAILED, "c.png": OK}
    ManifestWriter(output, shard=3).append([_record("b.png")])
    ManifestWriter(output, shard=5).append([_record("e.png")])

    assert _statuses(read_manifest(output)) == {"a.png": OK, "b.png": OK, "c.png": OK, "e.png": OK}
    assert set(read_manifest(output, shards=[5])) == {"e.png"}
    assert read_manifest(output, shards=[]) == {}  # only manifest.jsonl, and there is none yet
    names = storage.list_tree(output)
    if storage.is_s3(output):
        assert shard_records_name(3, s3=True) == "manifest.0003/"
        assert len([n for n in names if n.startswith("manifest.0003/")]) == 3  # one object per batch
    else:
        assert (
            names
            == [shard_records_name(3), shard_records_name(5)]
            == [
                "manifest.0003.jsonl",
                "manifest.0005.jsonl",
            ]
        )


def test_a_shard_of_a_flow_run_reads_only_its_own_records(output: str) -> None:
    write_manifest(storage.join(output, MANIFEST), {"a.png": _record("a.png")})  # 200,000 lines, say
    ManifestWriter(output, shard=1).append([_record("b.png")])
    ManifestWriter(output, shard=2).append([_record("c.png")])
    assert set(read_manifest(output, shards=[1])) == {"a.png", "b.png"}
    assert set(read_manifest(output, shards=[1], merged=False)) == {"b.png"}


def test_two_writers_of_one_shard_never_overwrite_each_other(output: str) -> None:
    attempt = ManifestWriter(output, shard=2)
    attempt.append([_record("a.png", FAILED)])
    time.sleep(0.01)  # the rerun starts later, while the first attempt still runs
    rerun = ManifestWriter(output, shard=2)
    rerun.append([_record("a.png")])
    attempt.append([_record("b.png")])
    rerun.append([_record("c.png")])

    assert _statuses(read_manifest(output, shards=[2])) == {"a.png": OK, "b.png": OK, "c.png": OK}
    if storage.is_s3(output):
        tokens = [name.split("/")[1].split(".")[0] for name in storage.list_tree(output, "manifest.0002/")]
        assert tokens[0] == tokens[1] < tokens[2] == tokens[3]  # the attempt's two objects, then the rerun's


def test_merge_leaves_one_line_per_input_and_deletes_every_shard_record(
    output: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage, "DELETE_BATCH", 2)  # S3 deletes in several calls, as past 1000 keys
    earlier = {"a.png": _record("a.png", FAILED), "z.png": _record("z.png")}  # an earlier run's manifest
    write_manifest(storage.join(output, MANIFEST), earlier)
    writer = ManifestWriter(output, shard=0)
    writer.append([_record("a.png"), _record("b.png", FAILED)])
    writer.append([_record("d.png")])
    ManifestWriter(output, shard=1).append([_record("c.png")])
    ManifestWriter(output, shard=1).append([_record("e.png")])
    storage.write_bytes(storage.join(output, "trainIds", "a.png"), b"png")

    assert status_counts(merge_manifests(output)) == {OK: 5, FAILED: 1}
    assert storage.list_tree(output) == [MANIFEST, "trainIds/a.png"]
    lines = storage.read_bytes(storage.join(output, MANIFEST)).decode().splitlines()
    assert [json.loads(line)["input"] for line in lines] == [f"{c}.png" for c in "abcdez"]
    assert json.loads(lines[0])["status"] == OK  # the shard's record is newer than the merged one
    assert status_counts(merge_manifests(output)) == {OK: 5, FAILED: 1}  # nothing left to fold
    assert storage.list_tree(output, "manifest.") == [MANIFEST]


def test_a_torn_last_line_costs_only_its_input(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    output = str(tmp_path)
    ManifestWriter(output).append([_record("a.png"), _record("b.png")])
    path = tmp_path / shard_records_name(0)
    with path.open("ab") as file:
        file.write(b'{"input": "c.png", "sta')  # the writer was killed mid-append
    with caplog.at_level(logging.WARNING):
        assert set(read_manifest(output)) == {"a.png", "b.png"}
    assert "unterminated last line" in caplog.text

    ManifestWriter(output).append([_record("c.png")])  # the rerun redoes c.png on a line of its own
    lines = path.read_text().splitlines()
    assert [json.loads(line)["input"] for line in lines] == ["a.png", "b.png", "c.png"]
    assert set(read_manifest(output)) == {"a.png", "b.png", "c.png"}

    path.write_bytes(b"not json\n" + path.read_bytes())  # damage inside the file is an error, named
    with pytest.raises(DataError, match=r"manifest\.0000\.jsonl line 1 is not JSON"):
        read_manifest(output)


def test_append_only_writes_the_records_size_and_the_old_rewrite_the_quadratic_sum(output: str) -> None:
    records = manifest_records(400)
    ours = timed(append_after_every_batch, storage.join(output, "ours"), records, 4)
    baseline = timed(rewrite_after_every_batch, storage.join(output, "baseline"), records, 4)

    lines = [_size([record]) for record in records]
    assert ours.bytes == sum(lines)  # linear: each record written once
    quadratic = sum(sum(lines[:end]) for end in range(4, 401, 4))  # the manifest's size after each batch
    assert baseline.bytes == quadratic == rewrite_totals(records, 4)[-1]
    assert quadratic > 50 * ours.bytes
    expected = {record["input"]: record for record in records}
    assert read_manifest(storage.join(output, "ours")) == expected
    assert read_manifest(storage.join(output, "baseline")) == expected


def test_the_bench_writes_its_rows_into_one_section_before_the_gpu_section(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## GPU check\n\nrows\n")
    argv = ["--records", "40", "--budget", "0", "--results", str(results), "--work-dir", str(tmp_path / "w")]
    assert main(argv) == 0
    assert main(argv) == 0  # a rerun replaces its section
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\n" + HEADING)
    assert text.endswith("\n## GPU check\n\nrows\n")  # make gpu-check rewrites from its heading to the end
    assert text.count(HEADING) == 1 and text.count("| manifest ") == 4
    assert "manifest writes, local folder, 4 records in batches of 4" in text
    assert "manifest bytes, S3 (moto in process), 40 records" in text and "| **no** |" not in text
