"""trainId labels: byte-identical to cityscapesscripts' own script, incremental, never half-written."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from cityscapesscripts.preparation import createTrainIdLabelImgs

from components.data.synth import generate_synthetic_cityscapes
from components.data.trainids import create_trainid_labels
from components.errors import DataError


def _trainids(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("gtFine/*/*/*_labelTrainIds.png"))
    }


@pytest.fixture
def generated(tmp_path: Path) -> Path:
    return generate_synthetic_cityscapes(tmp_path / "ours", train=6, val=3, height=64, width=128, seed=3)


def test_parallel_output_is_byte_identical_to_cityscapesscripts(
    generated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = tmp_path / "reference"
    shutil.copytree(generated / "gtFine", reference / "gtFine")
    monkeypatch.setenv("CITYSCAPES_DATASET", str(reference))
    createTrainIdLabelImgs.main()

    assert create_trainid_labels(generated, workers=2, progress=False) == 9
    ours, theirs = _trainids(generated), _trainids(reference)
    assert len(ours) == 9 and ours == theirs
    assert not list(generated.rglob("*.tmp*")), "temporary files left behind"


def test_up_to_date_outputs_are_skipped_and_stale_ones_rewritten(generated: Path) -> None:
    assert create_trainid_labels(generated, workers=1, progress=False) == 9
    expected = _trainids(generated)
    assert create_trainid_labels(generated, workers=2, progress=False) == 0

    outputs = sorted(generated.glob("gtFine/*/*/*_labelTrainIds.png"))
    outputs[0].unlink()
    outputs[1].write_bytes(outputs[1].read_bytes()[:40])  # truncated, e.g. by an old crash
    annotation = Path(str(outputs[1]).replace("_labelTrainIds.png", "_polygons.json"))
    later = outputs[1].stat().st_mtime + 5
    os.utime(annotation, (later, later))  # the annotation changed after the output was written

    assert create_trainid_labels(generated, workers=2, progress=False) == 2
    assert _trainids(generated) == expected


def test_unknown_label_names_the_annotation_and_leaves_no_output(generated: Path) -> None:
    annotation = sorted(generated.glob("gtFine/val/*/*_polygons.json"))[0]
    content = json.loads(annotation.read_text())
    content["objects"].append({"label": "flying saucer", "polygon": [[0, 0], [5, 0], [5, 5]]})
    annotation.write_text(json.dumps(content))
    with pytest.raises(DataError, match=annotation.name):
        create_trainid_labels(generated, workers=1, progress=False)
    assert not Path(str(annotation).replace("_polygons.json", "_labelTrainIds.png")).exists()
    assert not list(generated.rglob("*.tmp*"))


def test_no_annotations_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no \*_polygons\.json"):
        create_trainid_labels(tmp_path, progress=False)
