import pytest
import torch

from components import checkpoint, storage
from components.errors import CheckpointError


def _state(epoch: int) -> dict:
    return {"epoch": epoch, "model": {"w": torch.full((2,), float(epoch))}, "config": {"recipe": "demo"}}


@pytest.fixture(params=["local", "s3"])
def checkpoint_dir(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "ckpt")
    request.getfixturevalue("s3_endpoint")
    storage.s3_client().create_bucket(Bucket="ckpt")
    return "s3://ckpt/run-1"


def test_checkpoints_keep_the_last_epochs_and_best(checkpoint_dir):
    for epoch in (1, 2, 3):
        checkpoint.save_checkpoint(_state(epoch), checkpoint_dir, is_best=epoch == 2, keep_last=2)
    names = storage.list_names(checkpoint_dir)
    assert [n for n in names if n.endswith(".pt")] == ["best.pt", "epoch_0002.pt", "epoch_0003.pt"]
    assert checkpoint.load_latest_checkpoint(checkpoint_dir)["epoch"] == 3
    assert checkpoint.load_checkpoint(storage.join(checkpoint_dir, "best.pt"))["model"]["w"][0] == 2.0


def test_a_corrupt_newest_checkpoint_is_skipped_for_the_previous_one(checkpoint_dir):
    for epoch in (1, 2):
        checkpoint.save_checkpoint(_state(epoch), checkpoint_dir)
    newest = storage.join(checkpoint_dir, "epoch_0002.pt")
    storage.write_bytes(newest, storage.read_bytes(newest)[:100])  # truncated, as by a crash
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        checkpoint.load_checkpoint(newest)
    assert checkpoint.load_latest_checkpoint(checkpoint_dir)["epoch"] == 1


def test_no_checkpoint_means_a_fresh_start(tmp_path):
    assert checkpoint.load_latest_checkpoint(str(tmp_path / "empty")) is None


def test_atomic_path_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), storage.atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer crashed")
    assert list(tmp_path.iterdir()) == []


def test_background_saver_writes_a_snapshot_and_reports_a_failed_write(tmp_path):
    weights = torch.zeros(2)
    with checkpoint.BackgroundSaver() as saver:
        uri = saver.save({"epoch": 1, "model": {"w": weights}}, str(tmp_path / "ckpt"), is_best=True)
        weights.add_(1.0)  # the next optimizer step updates the live tensors in place
    assert uri == str(tmp_path / "ckpt" / "epoch_0001.pt")
    for name in ("epoch_0001.pt", "best.pt"):
        assert torch.equal(
            checkpoint.load_checkpoint(str(tmp_path / "ckpt" / name))["model"]["w"], torch.zeros(2)
        )

    occupied = tmp_path / "a-file"
    occupied.write_text("not a directory")
    with pytest.raises(OSError), checkpoint.BackgroundSaver() as saver:
        saver.save(_state(1), str(occupied / "ckpt"))
