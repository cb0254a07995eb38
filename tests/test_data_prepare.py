"""prepare_dataset: synthetic and local sources, idempotence, fingerprints, concurrent runs, the CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from components.config import DataConfig, SyntheticConfig
from components.data.__main__ import main
from components.data.prepare import (
    SYNTHETIC_MARKER,
    dataset_fingerprint,
    mark_prepared,
    prepare_dataset,
    unchanged_preparation,
)
from components.errors import DataError

SMALL = SyntheticConfig(train=4, val=2, height=32, width=64, cities=2, seed=0)


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*.png")}


def test_synthetic_is_generated_once_per_settings(tmp_path: Path) -> None:
    data = DataConfig(source="synthetic", root=str(tmp_path / "data"), synthetic=SMALL, trainid_workers=1)
    prepared = prepare_dataset(data)
    root = Path(prepared.root)
    assert root == (tmp_path / "data").resolve()
    assert len(list(root.glob("gtFine/*/*/*_labelTrainIds.png"))) == 6
    assert prepared.fingerprint == dataset_fingerprint(root) and len(prepared.fingerprint) == 64
    before = _mtimes(root)

    again = prepare_dataset(data)
    assert again == prepared and _mtimes(root) == before, "same settings: nothing regenerated"

    bigger = prepare_dataset(data.model_copy(update={"synthetic": SMALL.model_copy(update={"train": 6})}))
    assert bigger.fingerprint != prepared.fingerprint
    assert len(list(root.glob("leftImg8bit/train/*/*.png"))) == 6
    assert not list(root.glob(".synth-*")), "staging folder removed"


def test_synthetic_refuses_to_overwrite_a_foreign_dataset(tmp_path: Path) -> None:
    (tmp_path / "leftImg8bit" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=SYNTHETIC_MARKER):
        prepare_dataset(DataConfig(source="synthetic", root=str(tmp_path), synthetic=SMALL))
    assert (tmp_path / "leftImg8bit" / "train").is_dir()


def test_local_source_is_used_in_place(synthetic_root: Path, tmp_path: Path) -> None:
    local = tmp_path / "extracted"
    for name in ("leftImg8bit", "gtFine"):
        shutil.copytree(synthetic_root / name, local / name)
    for label in local.glob("gtFine/*/*/*_labelTrainIds.png"):
        label.unlink()
    prepared = prepare_dataset(DataConfig(source="local", uri=str(local), root=str(tmp_path / "unused")))
    assert prepared.root == str(local.resolve())
    assert prepared.fingerprint == dataset_fingerprint(synthetic_root)
    assert not (tmp_path / "unused").exists()

    with pytest.raises(DataError, match="does not exist"):
        prepare_dataset(DataConfig(source="local", uri=str(tmp_path / "missing")))


def test_fingerprint_follows_names_and_sizes(synthetic_root: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    for name in ("leftImg8bit", "gtFine"):
        shutil.copytree(synthetic_root / name, copy / name)
    assert dataset_fingerprint(copy) == dataset_fingerprint(synthetic_root)
    (copy / "gtFine" / "README").write_text("other files do not count")
    assert dataset_fingerprint(copy) == dataset_fingerprint(synthetic_root)
    image = sorted(copy.glob("leftImg8bit/val/*/*.png"))[0]
    image.write_bytes(image.read_bytes() + b"\0")
    assert dataset_fingerprint(copy) != dataset_fingerprint(synthetic_root)


def test_a_marked_preparation_is_unchanged_until_the_files_or_the_config_change(tmp_path: Path) -> None:
    data = DataConfig(source="synthetic", root=str(tmp_path / "data"), synthetic=SMALL, trainid_workers=1)
    prepared = prepare_dataset(data)
    assert unchanged_preparation(data) is None, "not marked yet"
    mark_prepared(data, prepared)
    assert unchanged_preparation(data) == prepared

    other_seed = data.model_copy(update={"synthetic": SMALL.model_copy(update={"seed": 1})})
    assert unchanged_preparation(other_seed) is None
    next(Path(prepared.root).glob("gtFine/val/*/*_labelTrainIds.png")).unlink()
    assert unchanged_preparation(data) is None, "a lost label changes the fingerprint"


@pytest.mark.slow
def test_concurrent_preparations_of_one_root_agree(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    command = [
        sys.executable,
        "-m",
        "components.data",
        "prepare",
        "--recipe",
        "demo",
        f"data.root={root}",
        "data.synthetic.train=6",
        "data.synthetic.val=2",
        "data.synthetic.height=32",
        "data.synthetic.width=64",
        "data.trainid_workers=1",
    ]
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    lines = {next(line for line in out.splitlines() if line.startswith("root=")) for out, _ in outputs}
    assert lines == {f"root={root.resolve()} fingerprint={dataset_fingerprint(root)}"}
    assert len(list(root.glob("gtFine/*/*/*_labelTrainIds.png"))) == 8


@pytest.mark.parametrize("verb", ["download", "synth", "trainids", "validate", "prepare"])
def test_every_verb_has_help(verb: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0
    assert "usage: python -m components.data " + verb in capsys.readouterr().out


def test_cli_trainids_and_validate(tmp_path: Path, capsys) -> None:
    assert (
        main(
            ["synth", "--out", str(tmp_path), "--train", "2", "--val", "2", "--height", "16", "--width", "32"]
        )
        == 0
    )
    assert main(["validate", "--root", str(tmp_path)]) == 1
    assert "without a trainId label" in capsys.readouterr().err
    assert main(["trainids", "--root", str(tmp_path), "--workers", "1"]) == 0
    assert main(["validate", "--root", str(tmp_path), "--values"]) == 0
    out = capsys.readouterr().out
    assert "wrote 4 trainId label images" in out and "train: 2 image/label pairs OK" in out
