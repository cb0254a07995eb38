"""Precision variants of plain model files (local and S3): which ones a model has, and the named error for
one it lacks. Registered versions: tests/test_registry.py; the export stage: tests/test_export.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.errors import ModelError
from components.predict.model_file import available_precisions, resolve_onnx


def _files(folder: Path, *names: str) -> Path:
    """``folder/<name>`` for each name (stand-ins: only their existence matters here); the fp32 path."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(name.encode())
    return folder / "model.onnx"


def test_a_local_file_offers_the_variants_beside_it(tmp_path: Path) -> None:
    alone = _files(tmp_path / "alone", "model.onnx", "other.int8.onnx")
    assert available_precisions(str(alone)) == ["fp32"]
    both = _files(tmp_path / "both", "model.onnx", "model.int8.onnx", "model.fp16.onnx")
    assert available_precisions(str(both)) == ["fp32", "fp16", "int8"]
    assert resolve_onnx(str(both), precision="int8") == both.with_name("model.int8.onnx")
    assert available_precisions(str(tmp_path / "missing.onnx")) == []


def test_a_variant_the_file_lacks_is_a_model_error_listing_what_it_has(tmp_path: Path) -> None:
    model = _files(tmp_path, "model.onnx", "model.int8.onnx")
    expected = f"{model} has no fp16 variant; it has: fp32, int8; export with export.fp16=true to add one"
    with pytest.raises(ModelError, match=expected):
        resolve_onnx(str(model), precision="fp16")
    with pytest.raises(ModelError, match=r"neither a models:/ URI nor an existing \.onnx file"):
        resolve_onnx(str(tmp_path / "missing.onnx"), precision="int8")
    with pytest.raises(ModelError, match=r"precision must be one of fp32, fp16, int8, got 'bf16'"):
        resolve_onnx(str(model), precision="bf16")


def test_an_s3_file_offers_its_variants_and_downloads_only_the_one_asked_for(
    s3_endpoint: str, tmp_path: Path
) -> None:
    from components import storage

    storage.s3_client().create_bucket(Bucket="models")
    storage.write_bytes("s3://models/v1/model.onnx", b"fp32")
    storage.write_bytes("s3://models/v1/model.int8.onnx", b"int8")
    assert available_precisions("s3://models/v1/model.onnx") == ["fp32", "int8"]
    with pytest.raises(
        ModelError, match=r"s3://models/v1/model.onnx has no fp16 variant; it has: fp32, int8"
    ):
        resolve_onnx("s3://models/v1/model.onnx", str(tmp_path / "cache"), precision="fp16")
    assert not (tmp_path / "cache").exists()
    local = resolve_onnx("s3://models/v1/model.onnx", str(tmp_path / "cache"), precision="int8")
    assert local == tmp_path / "cache" / "s3" / "models" / "v1" / "model.int8.onnx"
    assert local.read_bytes() == b"int8"


def test_registering_a_variant_the_export_did_not_write_is_a_registry_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from components.config import load_config
    from components.errors import RegistryError
    from components.registry import register_model

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the run_dir's own SQLite store
    cfg = load_config("demo", [f"run_dir={tmp_path}", "tracking.system_metrics=false", "export.fp16=true"])
    model = _files(tmp_path / "export", "model.onnx", "model.int8.onnx")
    missing = model.with_name("model.fp16.onnx")
    with pytest.raises(RegistryError, match=f"export.fp16 is on but {missing} does not exist"):
        register_model(cfg, "run-1", "never-loaded.pt", str(model), 0.5, 0.4, "fp")


def test_a_bench_row_whose_outputs_differ_meets_no_target() -> None:
    from bench.common import make_row
    from bench.inference import judged

    fast_but_wrong = judged(make_row("int8", "images/s", 3.0, 1.0, False, (">=", 1.5)))
    assert fast_but_wrong.met is False and fast_but_wrong.notes.endswith("the output check failed")
    assert judged(make_row("fp32", "images/s", 3.0, 1.0, True, (">=", 1.5))).met is True
    assert judged(make_row("slow", "images/s", 1.0, 1.0, False, (">=", 1.5))).met is False
    assert judged(make_row("no target", "images/s", 3.0, 1.0, False)).met is None
