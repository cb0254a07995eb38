"""One device policy (auto, cuda, cpu) for every onnxruntime session, with the real onnxruntime: the
installed build is the GPU one, ``cuda`` without a GPU fails by name listing what is missing (never a
silent CPU run), and ``auto`` on a CPU machine runs on, and records, CPUExecutionProvider. The model is a
hand-built 1x1 convolution (3 -> 19 classes) with the metadata predict needs, so no export is waited for."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from components.errors import ConfigError, DeviceError
from components.serving import CPU, CUDA, DEVICE_ENV, cuda_problems, missing_cuda_libraries, open_session

GPU_VISIBLE = not cuda_problems()
no_gpu = pytest.mark.skipif(GPU_VISIBLE, reason="a GPU is visible: these tests check the CPU-only machine")
LINUX_X86 = sys.platform == "linux" and platform.machine() == "x86_64"


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> str:
    """image (N x 3 x H x W) -> logits (N x 19 x H x W) through one 1x1 convolution, with mean/std."""
    weight = np.random.default_rng(0).normal(size=(19, 3, 1, 1)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "weight"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 19, "height", "width"])],
        [numpy_helper.from_array(weight, "weight")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    helper.set_model_props(
        model, {"mean": json.dumps([0.485, 0.456, 0.406]), "std": json.dumps([0.229, 0.224, 0.225])}
    )
    path = tmp_path_factory.mktemp("tiny") / "model.onnx"
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "c.png"):
        cv2.imwrite(str(folder / name), rng.integers(0, 256, (32, 64, 3), dtype=np.uint8))
    return folder


@pytest.mark.skipif(not LINUX_X86, reason="the GPU build of onnxruntime is installed on Linux x86_64 only")
def test_installed_onnxruntime_is_the_gpu_build() -> None:
    assert CUDA in ort.get_available_providers()
    assert importlib.metadata.version("onnxruntime-gpu") == ort.__version__
    # It finds the CUDA runtime and cuDNN of torch's nvidia-* wheels (the same check as the image build's).
    assert missing_cuda_libraries() == []
    # The CPU build installs the same module: both at once would overwrite each other's files.
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("onnxruntime")


@no_gpu
def test_cuda_without_a_gpu_is_a_device_error_listing_what_is_missing(tiny_onnx: str) -> None:
    with pytest.raises(DeviceError) as error:
        open_session(tiny_onnx, "cuda")
    message = str(error.value)
    assert message.startswith("device=cuda, but onnxruntime cannot run on a GPU here:\n  - ")
    if LINUX_X86:  # the GPU build is installed, so the driver is what is missing
        assert "no NVIDIA driver: libcuda.so.1 cannot be loaded" in message
    else:
        assert "the CPU-only build" in message
    assert message.endswith("use device=auto (falls back to the CPU) or device=cpu.")


@no_gpu
def test_auto_falls_back_to_the_cpu_and_says_why(tiny_onnx: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="components.serving")
    assert open_session(tiny_onnx, "auto").get_providers() == [CPU]
    assert "device=auto: no usable GPU (" in caplog.text
    assert f"model.onnx runs on {CPU} (device=auto)" in caplog.text


def test_cpu_never_tries_cuda_and_unknown_devices_are_refused(tiny_onnx: str) -> None:
    assert open_session(tiny_onnx, "cpu").get_providers() == [CPU]
    with pytest.raises(ConfigError, match=r"device must be one of auto, cuda, cpu, got 'gpu'"):
        open_session(tiny_onnx, "gpu")


@no_gpu
def test_predict_auto_records_the_cpu_provider_and_cuda_writes_nothing(
    tiny_onnx: str, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from components.predict import read_manifest, segment_inputs
    from components.predict.__main__ import main

    out = tmp_path / "out"
    code = main(["--model", tiny_onnx, "--input", str(images), "--output", str(out), "--device", "cuda"])
    error = capsys.readouterr().err
    assert code == 1 and "Traceback" not in error
    assert "error: device=cuda, but onnxruntime cannot run on a GPU here" in error
    assert not out.exists()

    summary = segment_inputs(tiny_onnx, str(images), str(out), progress=False)
    assert summary.provider == CPU and len(summary.segmented) == 3
    records = read_manifest(str(out))
    assert len(records) == 3 and {r["provider"] for r in records.values()} == {CPU}

    assert (
        main(["--model", tiny_onnx, "--input", str(images), "--output", str(tmp_path / "cpu"), "--cpu"]) == 0
    )
    assert f"on {CPU}" in capsys.readouterr().out


@no_gpu
def test_pyfunc_takes_its_device_from_model_config_then_the_environment(
    tiny_onnx: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from components.serving import _load_pyfunc

    monkeypatch.setenv(DEVICE_ENV, "cuda")
    with pytest.raises(DeviceError, match="libcuda.so.1" if LINUX_X86 else "CPU-only build"):
        _load_pyfunc(tiny_onnx)
    model = _load_pyfunc(tiny_onnx, {"device": "cpu"})
    assert model.segmenter.provider == CPU
    masks = model.predict(np.zeros((1, 8, 16, 3), np.uint8))
    assert masks.shape == (1, 8, 16) and masks.dtype == np.uint8


def test_export_with_cuda_fails_before_exporting(tmp_path: Path) -> None:
    from components.export import export_onnx

    if GPU_VISIBLE:
        pytest.skip("a GPU is visible")
    out = tmp_path / "model.onnx"
    # The checkpoint does not even exist: the device is checked before the (long) export starts.
    with pytest.raises(DeviceError):
        export_onnx(str(tmp_path / "missing.pt"), str(out), str(tmp_path), device="cuda")
    assert not out.exists()


@pytest.fixture(scope="module")
def prefect_server() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@no_gpu
@pytest.mark.slow
def test_predict_flow_records_the_provider_and_cuda_fails_before_any_shard(
    prefect_server: None, tiny_onnx: str, images: Path, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client

    from components.predict import read_manifest
    from flows.predict import predict

    out = tmp_path / "out"
    state = predict(inputs=str(images), output=str(out), model=tiny_onnx, device="cuda", return_state=True)
    assert state.is_failed()
    with pytest.raises(DeviceError, match="libcuda.so.1" if LINUX_X86 else "CPU-only build"):
        state.result()
    assert not out.exists()

    summary = predict(inputs=str(images), output=str(out), model=tiny_onnx)
    assert summary["device"] == "auto" and summary["provider"] == CPU and summary["segmented"] == 3
    assert {r["provider"] for r in read_manifest(str(out)).values()} == {CPU}
    with get_client(sync_client=True) as client:
        (artifact,) = [a for a in client.read_artifacts() if a.key == "predict-summary"]
    assert f"in 1 shard(s) on {CPU} (device=auto)." in artifact.data


def test_gpu_pool_predict_deployments_require_cuda() -> None:
    import yaml

    from flows import predict as flows_predict

    required = {"inputs": "in/", "output": "out/", "model": "m.onnx", "work": "w.jsonl", "shard": 0}
    deployments = yaml.safe_load((Path(__file__).parents[1] / "deploy" / "prefect.yaml").read_text())
    found = {}
    for deployment in deployments["deployments"]:
        if deployment["entrypoint"].startswith("flows/predict.py:"):
            parameters = deployment["parameters"]
            found.setdefault(deployment["name"], set()).add(parameters["device"])
            # Prefect validates a run's parameters against the flow's signature (Literal device).
            flow = getattr(flows_predict, deployment["entrypoint"].partition(":")[2])
            names = flow.parameters.properties
            flow.validate_parameters({**{k: v for k, v in required.items() if k in names}, **parameters})
    assert found == {"cityscapes": {"cuda"}, "cityscapes-k8s": {"cuda"}, "cityscapes-local": {"auto"}}
