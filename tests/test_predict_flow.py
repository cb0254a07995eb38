"""The predict flow's own checks, before any shard starts: the shard settings and the shard deployment
(through a real Prefect API), and the shards' input lists."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from components.errors import ConfigError


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"shards": 2},
            "shards=2 runs each shard as a flow run of a shard deployment: pass shard_deployment",
        ),
        ({"shards": 0}, "need shards >= 1"),
        ({"max_parallel": 0, "shard_deployment": "predict-shard/x"}, "max_parallel >= 1: got 1, 2, 0"),
    ],
)
def test_shard_settings_are_refused_before_anything_runs(
    settings: dict[str, object], message: str, tmp_path: Path
) -> None:
    from flows.predict import predict

    with pytest.raises(ConfigError, match=message):
        predict.fn(inputs=str(tmp_path / "in"), output=str(tmp_path / "out"), **settings)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_missing_shard_deployment_is_named(prefect_api: None, tmp_path: Path) -> None:
    from flows.predict import predict

    with pytest.raises(ConfigError, match="deployment predict-shard/nowhere not found: deploy it first"):
        predict.fn(
            inputs=str(tmp_path),
            output=str(tmp_path / "out"),
            shards=4,
            shard_deployment="predict-shard/nowhere",
        )
    assert not (tmp_path / "out").exists()


def test_a_shards_input_list_round_trips(tmp_path: Path) -> None:
    from components.predict import InputRef
    from flows.predict import read_work, write_work

    refs = [InputRef("s3://b/in/straße 1.png", "straße 1.png"), InputRef("/data/a/b.jpg", "a/b.png")]
    write_work(str(tmp_path / "0003.jsonl"), refs)
    assert read_work(str(tmp_path / "0003.jsonl")) == refs
