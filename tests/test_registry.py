"""Registry end to end: real moto S3, a real MLflow server proxying artifacts to it, a fresh process
pulling the champion by alias, the pyfunc returning masks, and no secret anywhere."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pytest
import torch

from tests.mlflowserver import MlflowServer, proxied_mlflow_server
from tests.s3server import TEST_CREDENTIALS
from tests.test_export import shared_export, tiny_config

SECRET = TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
NAME = "cityscapes-deeplabv3"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MlflowServer, str]]:
    """Clients get only the tracking URI (see proxied_mlflow_server)."""
    with proxied_mlflow_server(tmp_path_factory.mktemp("mlflow")) as (srv, s3):
        yield srv, s3


def _training_run(cfg) -> str:
    from components.tracking import mlflow_run

    with mlflow_run(cfg, "train") as run:
        mlflow.log_metric("val_miou", 0.1)
    return run.info.run_id


def _bucket_objects(endpoint: str, bucket: str) -> dict[str, bytes]:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
    )
    keys = [
        o["Key"]
        for p in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for o in p.get("Contents", [])
    ]
    return {key: client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


def _torch_argmax(checkpoint: str, images: list[np.ndarray]) -> np.ndarray:
    from components.config import IMAGENET_MEAN, IMAGENET_STD
    from components.model import load_model

    model, _ = load_model(checkpoint)
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    batch = (batch - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        return model(batch)["out"].argmax(1).numpy()


@pytest.mark.slow
def test_register_promote_pull_and_serve(
    server,
    tmp_path: Path,
    tmp_path_factory,
    synthetic_root: Path,
    caplog,
    capfd,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from components.registry import register_model

    srv, s3 = server
    caplog.set_level("DEBUG")
    checkpoint, exported = shared_export(tmp_path_factory, synthetic_root)
    cfg = tiny_config("tracking.system_metrics=false", f"run_dir={tmp_path}")
    run1 = _training_run(cfg)
    args = (checkpoint, exported.onnx_path)

    first = register_model(cfg, run1, *args, val_miou=0.50, baseline_miou=0.40, dataset_fingerprint="fp1")
    assert (first.version, first.created, first.promoted) == ("1", True, True)
    assert first.aliases == ["challenger", "champion"]

    again = register_model(cfg, run1, *args, val_miou=0.50, baseline_miou=0.40, dataset_fingerprint="fp1")
    assert (again.version, again.created) == ("1", False)
    client = mlflow.MlflowClient()
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 1

    worse = register_model(
        cfg, _training_run(cfg), *args, val_miou=0.45, baseline_miou=0.4, dataset_fingerprint="fp1"
    )
    assert (worse.version, worse.promoted, worse.aliases, worse.champion_miou) == (
        "2",
        False,
        ["challenger"],
        0.5,
    )
    assert client.get_model_version_by_alias(NAME, "champion").version == "1"
    assert "kept as challenger" in client.get_model_version(NAME, "2").description

    run3 = _training_run(cfg)
    better = register_model(cfg, run3, *args, val_miou=0.60, baseline_miou=0.4, dataset_fingerprint="fp1")
    assert (better.version, better.promoted, better.aliases) == ("3", True, ["challenger", "champion"])
    assert client.get_model_version_by_alias(NAME, "champion").version == "3"
    assert client.get_model_version(NAME, "1").aliases == []
    tags = client.get_model_version(NAME, "3").tags
    assert {
        k: tags[k] for k in ("val_miou", "baseline_miou", "recipe", "dataset_fingerprint", "training_run_id")
    } == {
        "val_miou": "0.600000",
        "baseline_miou": "0.400000",
        "recipe": "demo",
        "dataset_fingerprint": "fp1",
        "training_run_id": run3,
    }
    assert tags["git_commit"]
    run_data = client.get_run(run3).data
    assert run_data.tags["registry.version"] == "3" and run_data.metrics["registry.champion_val_miou"] == 0.5

    # The artifacts live in the bucket, behind the server.
    objects = _bucket_objects(s3, srv.bucket)
    onnx_keys = [k for k in objects if k.endswith("onnx/model.onnx")]
    assert len(onnx_keys) == 3 and all(k.startswith("mlartifacts/") for k in onnx_keys)
    assert objects[onnx_keys[0]] == Path(exported.onnx_path).read_bytes()

    # A fresh process pulls the champion by alias and segments the validation images.
    val_dir = synthetic_root / "leftImg8bit" / "val"
    val_images = sorted(val_dir.rglob("*.png"))
    rgb = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in val_images]
    out = tmp_path / "pred"
    env = {**os.environ, "CITYSEG_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-m", "components.predict", "--model", f"models:/{NAME}@champion",
         "--input", str(val_dir), "--output", str(out), "--cpu"],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cache" / NAME / "3" / "model.onnx").is_file()
    # Through the server, not presigned URLs to the store (whose address clients may not resolve).
    server_log = srv.log_path.read_text()
    assert (
        "/model-versions/get-download-uri" in server_log and "/mlflow-artifacts/presigned/" not in server_log
    )
    predicted = np.stack(
        [cv2.imread(str(out / "trainIds" / p.relative_to(val_dir)), cv2.IMREAD_UNCHANGED) for p in val_images]
    )  # fmt: skip
    expected = _torch_argmax(checkpoint, rgb)
    assert predicted.shape == expected.shape == (len(val_images), 64, 128)
    assert (predicted == expected).mean() >= 0.999

    # The registered pyfunc serves masks equal to the ONNX argmax.
    from components.serving import Segmenter

    (tmp_path / "pyfunc").mkdir()
    served = mlflow.pyfunc.load_model(f"models:/{NAME}@champion", dst_path=str(tmp_path / "pyfunc"))
    served = served.predict(np.stack(rgb))
    assert served.dtype == np.uint8 and served.shape == expected.shape
    np.testing.assert_array_equal(served, Segmenter(exported.onnx_path).masks(np.stack(rgb)))

    # The pytorch flavour of the same version loads through components.model.
    from components.model import load_model

    # ... and leaves no copy of the model folder behind (MLflow's default is a temp folder never removed).
    temp_root = tmp_path / "temp-root"
    temp_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp_root))
    model, loaded_cfg = load_model(f"models:/{NAME}@champion")
    assert loaded_cfg.recipe == "demo" and isinstance(model, torch.nn.Module)
    assert not list(temp_root.iterdir())

    # No secret anywhere: logs, output, server log, params, tags, artifacts.
    captured = capfd.readouterr()
    texts = [caplog.text, captured.out, captured.err, done.stdout, done.stderr, srv.log_path.read_text()]
    for run_id in (run1, run3):
        data = client.get_run(run_id).data
        texts += [repr(data.params), repr(data.tags)]
    texts += [repr(client.get_model_version(NAME, v).tags) for v in ("1", "2", "3")]
    assert not [t for t in texts if SECRET in t]
    assert not [k for k, body in objects.items() if SECRET.encode() in body]


@pytest.mark.slow
def test_variants_are_registered_offered_and_pulled_by_predict(
    server, tmp_path: Path, synthetic_root: Path
) -> None:
    import json

    from components.errors import ModelError
    from components.export import export_onnx
    from components.predict.model_file import available_precisions, resolve_model
    from components.registry import register_model
    from tests.test_export import make_checkpoint

    name = "int8-deeplabv3"
    common = [
        "tracking.system_metrics=false", f"run_dir={tmp_path}", f"registry.model_name={name}",
        "export.exporter=torchscript",
    ]  # fmt: skip
    plain = tiny_config(*common)
    cfg = tiny_config(*common, "export.fp16=true", "export.int8=true", "export.int8_min_argmax_agreement=0.9")
    checkpoint = make_checkpoint(tmp_path / "ckpt", cfg=cfg)
    exported = export_onnx(
        checkpoint, str(tmp_path / "export" / "model.onnx"), str(synthetic_root), cfg, device="cpu"
    )
    assert register_model(cfg, _training_run(cfg), checkpoint, exported.onnx_path, 0.5, 0.4, "fp").promoted
    # No better than the champion within the 6 decimals its tag keeps: not promoted by dropped digits.
    retrained = register_model(cfg, _training_run(cfg), checkpoint, exported.onnx_path, 0.5000004, 0.4, "fp")
    assert (retrained.version, retrained.promoted) == ("2", False)

    client = mlflow.MlflowClient()
    assert client.get_model_version(name, "1").tags["onnx_variants"] == "fp32,fp16,int8"
    assert available_precisions(f"models:/{name}@champion") == ["fp32", "fp16", "int8"]
    cache = tmp_path / "cache"
    fp16, model_id = resolve_model(f"models:/{name}@champion", str(cache), precision="fp16")
    assert fp16 == cache / name / "1" / "model.fp16.onnx"
    assert fp16.read_bytes() == Path(exported.fp16_path).read_bytes()
    assert (model_id.name, model_id.version, model_id.precision) == (name, "1", "fp16")

    val_dir = synthetic_root / "leftImg8bit" / "val"
    env = {**os.environ, "CITYSEG_CACHE": str(cache)}

    def predict(model: str, out: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "components.predict", "--model", model, "--precision", "int8",
             "--input", str(val_dir), "--output", str(out), "--cpu", "--no-overlay"],
            env=env, capture_output=True, text=True, timeout=240,
        )  # fmt: skip

    done = predict(f"models:/{name}@champion", tmp_path / "pred")
    assert done.returncode == 0, done.stderr
    cached = cache / name / "1" / "model.int8.onnx"  # v1: the champion
    assert cached.read_bytes() == Path(exported.int8_path).read_bytes()
    records = [json.loads(line) for line in (tmp_path / "pred" / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 4 and {
        (r["model_version"], r["model_precision"], r["status"]) for r in records
    } == {("1", "int8", "ok")}

    # A version registered without the variants has only fp32: asking it for int8 is a ModelError that
    # lists what it has, raised before anything is downloaded.
    lone = register_model(plain, _training_run(plain), checkpoint, exported.onnx_path, 0.5, 0.4, "fp")
    assert (lone.version, client.get_model_version(name, "3").tags["onnx_variants"]) == ("3", "fp32")
    assert available_precisions(f"models:/{name}/3") == ["fp32"]
    expected = (
        rf"models:/{name}@challenger \(version 3\) has no int8 variant; it has: fp32; "
        "export with export.int8=true to add one"
    )
    with pytest.raises(ModelError, match=expected):
        resolve_model(f"models:/{name}@challenger", str(cache), precision="int8")
    assert not (cache / name / "3").exists()

    # A plain file without the variant: the same named error from the CLI, not a traceback.
    alone = tmp_path / "alone" / "model.onnx"
    alone.parent.mkdir()
    alone.write_bytes(Path(exported.onnx_path).read_bytes())
    missing = predict(str(alone), tmp_path / "missing")
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert f"{alone} has no int8 variant; it has: fp32; export with export.int8=true" in missing.stderr


@pytest.mark.slow
def test_unreachable_server_is_a_registry_error(
    tmp_path: Path, tmp_path_factory, synthetic_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from components.errors import RegistryError
    from components.registry import register_model
    from tests.s3server import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setattr("components.tracking.registry_write.time.sleep", lambda _seconds: None)
    checkpoint, exported = shared_export(tmp_path_factory, synthetic_root)
    cfg = tiny_config(f"tracking.tracking_uri=http://127.0.0.1:{free_port()}")
    with pytest.raises(RegistryError, match=r"unreachable .* after 4 attempts"):
        register_model(cfg, "run-x", checkpoint, exported.onnx_path, 0.5, 0.4, "fp")
