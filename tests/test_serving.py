"""The registered model serves from a lean environment: a fresh virtualenv holding only the requirements
the model declares (no torch, no project), a real MLflow server with artifacts in S3 (moto), the model
loaded by alias in a process where the project is not importable, and ``mlflow models serve`` answering a
real REST request with masks.

The virtualenv is built once and cached under ``$CITYSEG_TEST_CACHE`` (default
``~/.cache/cityseg-ops/test-venvs``), keyed by the pinned requirement list and the Python version.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime as ort
import pytest

from tests.mlflowserver import MlflowServer, proxied_mlflow_server, stop_group
from tests.s3server import LOOPBACK, free_port, wait_for_http
from tests.test_export import shared_export, tiny_config

NAME = "lean-cityscapes-deeplabv3"
RGB = np.random.default_rng(0).integers(0, 255, (2, 32, 64, 3), dtype=np.uint8)


def _pins() -> list[str]:
    from components.serving import SERVING_REQUIREMENTS
    from components.tracking.registry_write import _pinned_requirements

    return _pinned_requirements(SERVING_REQUIREMENTS)


@pytest.fixture(scope="session")
def lean_python() -> Path:
    """The Python of a virtualenv with exactly the model's declared requirements (built once, cached)."""
    pins = _pins()
    key = hashlib.sha256(json.dumps([sys.version_info[:2], pins]).encode()).hexdigest()[:16]
    root = Path(os.environ.get("CITYSEG_TEST_CACHE", Path.home() / ".cache" / "cityseg-ops" / "test-venvs"))
    venv = root / key
    if not (venv / ".complete").is_file():
        # Built in place (venv scripts hard-code their path); `.complete`, written last, marks it usable.
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *pins],
            check=True, capture_output=True, timeout=900,
        )  # fmt: skip
        (venv / ".complete").write_text("\n".join(pins) + "\n")
    return venv / "bin" / "python"


@pytest.fixture(scope="module")
def registered(
    tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path
) -> Iterator[tuple[MlflowServer, str]]:
    """A real MLflow server (artifacts proxied to moto S3) holding one champion; yields it and the ONNX."""
    from components.registry import register_model
    from components.tracking import mlflow_run

    with proxied_mlflow_server(tmp_path_factory.mktemp("mlflow")) as (srv, _s3):
        checkpoint, exported = shared_export(tmp_path_factory, synthetic_root)
        work = tmp_path_factory.mktemp("lean-run")
        cfg = tiny_config("tracking.system_metrics=false", f"run_dir={work}", f"registry.model_name={NAME}")
        with mlflow_run(cfg, "train") as run:
            mlflow.log_metric("val_miou", 0.1)
        result = register_model(cfg, run.info.run_id, checkpoint, exported.onnx_path, 0.5, 0.4, "fp")
        assert result.promoted
        yield srv, exported.onnx_path


def _lean_env(tracking_uri: str) -> dict[str, str]:
    """No project on the path, no S3 keys: the model comes through the MLflow server only."""
    keep = ("PATH", "HOME", "LANG", "TMPDIR")
    return {**{k: os.environ[k] for k in keep if k in os.environ}, "MLFLOW_TRACKING_URI": tracking_uri}


LOAD_AND_PREDICT = """
import importlib.util, sys
import mlflow.pyfunc, numpy as np
assert importlib.util.find_spec("torch") is None and importlib.util.find_spec("cv2") is None
assert importlib.util.find_spec("components") is None, "the project must not be importable here"
model = mlflow.pyfunc.load_model(sys.argv[1])
masks = model.predict(np.load(sys.argv[2]))
np.save(sys.argv[3], masks)
print(sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "cityscapesscripts", "cv2")))
"""


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_champion_loads_and_serves_from_a_lean_environment(
    lean_python: Path, registered: tuple[MlflowServer, str], tmp_path: Path
) -> None:
    from components.serving import Segmenter

    srv, onnx_path = registered
    uri = f"models:/{NAME}@champion"
    expected = Segmenter(onnx_path).masks(RGB)

    # The model declares only what the serving module imports, pinned.
    requirements = Path(
        mlflow.artifacts.download_artifacts(f"{uri}/requirements.txt", dst_path=str(tmp_path))
    )
    declared = [line for line in requirements.read_text().splitlines() if line and not line.startswith("-")]
    assert declared == _pins()
    # The CPU build of the onnxruntime tested here, also where that is onnxruntime-gpu (the same module).
    assert f"onnxruntime=={ort.__version__}" in declared
    code = Path(mlflow.artifacts.download_artifacts(f"{uri}/code", dst_path=str(tmp_path / "code")))
    assert sorted(p.name for p in (code / "components").iterdir()) == [
        "__init__.py", "errors.py", "labels.py", "serving.py",
    ]  # fmt: skip

    # Loaded by alias in a fresh process of the lean venv, outside the project.
    np.save(tmp_path / "in.npy", RGB)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    done = subprocess.run(
        [str(lean_python), "-c", LOAD_AND_PREDICT, uri, str(tmp_path / "in.npy"), str(tmp_path / "out.npy")],
        cwd=outside, env=_lean_env(srv.tracking_uri), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"  # no torch, cityscapesscripts or OpenCV imported
    masks = np.load(tmp_path / "out.npy")
    assert masks.dtype == np.uint8 and masks.shape == (2, 32, 64)
    np.testing.assert_array_equal(masks, expected)

    # Asked for the GPU, the lean (CPU onnxruntime) environment refuses to load rather than serve on the CPU.
    refused = subprocess.run(
        [str(lean_python), "-c", LOAD_AND_PREDICT, uri, str(tmp_path / "in.npy"), str(tmp_path / "gpu.npy")],
        cwd=outside, env={**_lean_env(srv.tracking_uri), "CITYSEG_DEVICE": "cuda"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert refused.returncode != 0 and not (tmp_path / "gpu.npy").exists()
    assert "DeviceError: device=cuda" in refused.stderr and "CPU-only build" in refused.stderr, refused.stderr

    # `mlflow models serve` of the lean venv answers the documented JSON input with masks.
    port = free_port()
    log = tmp_path / "serve.log"
    # As in an activated venv: the server starts `uvicorn` from PATH.
    activated = {**_lean_env(srv.tracking_uri)}
    activated["PATH"] = f"{lean_python.parent}{os.pathsep}{activated.get('PATH', '')}"
    with log.open("wb") as log_file:
        server = subprocess.Popen(
            [str(lean_python), "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
             "--host", "127.0.0.1", "--port", str(port)],
            cwd=outside, env=activated, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", timeout=180, process=server)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": RGB.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with LOOPBACK.open(request, timeout=120) as response:
            answer = json.loads(response.read())
    finally:
        stop_group(server)
    served = np.asarray(answer["predictions"])
    np.testing.assert_array_equal(served, expected, err_msg=log.read_text()[-2000:])
