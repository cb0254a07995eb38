"""The lean half of inference: an ONNX session that turns uint8 RGB images into trainId masks.

This module is the ``python_function`` loader of registered models (``loader_module:
components.serving``). The registered model bundles only this file, ``components/labels.py`` (plain data)
and ``components/errors.py`` in its ``code/``, and declares only what they import: mlflow-skinny,
onnxruntime (swap in onnxruntime-gpu at serve time for CUDA), numpy and pandas (MLflow's scoring server).
Keep it that way: no torch, cityscapesscripts, pydantic, OpenCV or other ``components`` imports here.

It also holds the one device policy of every onnxruntime session (predict, the predict flow, the pyfunc,
the export stage's parity gate): ``device`` is ``auto`` (CUDA when a GPU is visible, else the CPU),
``cuda`` (a GPU or a DeviceError listing what is missing: never a silent CPU run) or ``cpu``.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import onnxruntime as ort

from components.errors import ConfigError, DataError, DeviceError, ModelError

logger = logging.getLogger(__name__)

SERVING_REQUIREMENTS = ("mlflow-skinny", "onnxruntime", "numpy", "pandas")
"""What the served model imports (pandas: MLflow's scoring server parses requests with it). The CPU build
of onnxruntime; a GPU server swaps in onnxruntime-gpu of the same version (docs/inference.md, Serving)."""

BUNDLED_MODULES = ("__init__.py", "errors.py", "labels.py", "serving.py")
"""The files of ``components/`` that a registered model carries in its ``code/components/``."""

PRECISIONS = ("fp32", "fp16", "int8")
"""ONNX variants the export stage can write beside ``model.onnx`` (fp16 for GPUs, int8 for CPUs)."""

Device = Literal["auto", "cuda", "cpu"]
"""Where onnxruntime runs: auto (CUDA when a GPU is visible, else the CPU), cuda (or a DeviceError), cpu."""
DEVICES: tuple[str, ...] = get_args(Device)
DEVICE_ENV = "CITYSEG_DEVICE"
"""The served model's device (``mlflow models serve``, ``pyfunc.load_model`` without model_config)."""
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def variant_path(onnx_path: str, precision: str) -> str:
    """``model.onnx`` -> ``model.<precision>.onnx`` (beside it); fp32 is the file itself."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return onnx_path
    stem = onnx_path[: -len(".onnx")] if onnx_path.endswith(".onnx") else onnx_path
    return f"{stem}.{precision}.onnx"


def open_session(
    onnx_path: str | Path, device: str = "auto", cuda_options: dict[str, str] | None = None
) -> ort.InferenceSession:
    """An onnxruntime session for ``onnx_path`` on ``device`` (see :data:`DEVICES`; ``cuda_options``:
    CUDAExecutionProvider options); logs the provider it runs on (``session.get_providers()[0]``)."""
    missing = check_device(device)
    session = None
    if device != "cpu" and not missing:
        session = _session(onnx_path, [(CUDA, cuda_options or {}), CPU])
        if session.get_providers()[0] != CUDA:  # onnxruntime falls back to the CPU with only a log line
            missing = [f"onnxruntime could not start its {CUDA} (its own error is logged above)"]
            if device == "cuda":
                raise _device_error(missing)
    if missing:
        logger.info("device=auto: no usable GPU (%s)", "; ".join(missing))
    if session is None:
        session = _session(onnx_path, [CPU])
    logger.info("%s runs on %s (device=%s)", Path(onnx_path).name, session.get_providers()[0], device)
    return session


def check_device(device: str) -> list[str]:
    """Checks ``device`` before any model is loaded: ConfigError if unknown, DeviceError for ``cuda``
    where onnxruntime cannot use a GPU; otherwise why ``auto`` will run on the CPU (empty: it tries CUDA)."""
    if device not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    missing = [] if device == "cpu" else cuda_problems()
    if missing and device == "cuda":
        raise _device_error(missing)
    return missing


def _device_error(missing: list[str]) -> DeviceError:
    return DeviceError(
        "device=cuda, but onnxruntime cannot run on a GPU here:\n  - "
        + "\n  - ".join(missing)
        + "\nFix the above, or use device=auto (falls back to the CPU) or device=cpu."
    )


def _session(onnx_path: str | Path, providers: list[Any]) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(onnx_path), providers=providers)
    except Exception as exc:  # onnxruntime raises its own untyped errors for unreadable models
        raise ModelError(f"cannot load ONNX model {onnx_path}: {exc}") from None


def cuda_problems() -> list[str]:
    """What keeps onnxruntime's CUDA provider from starting here, each with its remedy (empty: nothing
    known; the session still has to show that the provider started)."""
    problems = []
    if CUDA not in ort.get_available_providers():
        problems.append(
            f"onnxruntime {ort.__version__} is the CPU-only build (no {CUDA}): "
            "pip uninstall -y onnxruntime && pip install onnxruntime-gpu"
        )
    elif sys.platform == "linux":
        problems += missing_cuda_libraries()
    if sys.platform == "linux":
        problems += _driver_problems()
    return problems


def missing_cuda_libraries() -> list[str]:
    """The CUDA runtime and cuDNN libraries onnxruntime-gpu needs that cannot be loaded: from the nvidia-*
    wheels (torch's, or onnxruntime-gpu[cuda,cudnn]), else from the system's library path."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # preload_dlls prints, rather than raises, what it misses
        ort.preload_dlls()
    missing = sorted(set(re.findall(r"Failed to load ([^/\s:]+):", printed.getvalue())))
    try:  # cuDNN is optional to preload_dlls, but every convolution of the model needs it
        ctypes.CDLL("libcudnn.so.9")
    except OSError:
        missing.append("libcudnn.so.9")
    if not missing:
        return []
    return [
        f"CUDA runtime/cuDNN libraries not found: {', '.join(missing)} "
        "(pip install nvidia-cuda-runtime nvidia-cublas nvidia-curand nvidia-cufft nvidia-cudnn-cu13, "
        "which torch's CUDA wheels already bring, or put a CUDA 13 + cuDNN 9 install on LD_LIBRARY_PATH)"
    ]


def _driver_problems() -> list[str]:
    """Whether the NVIDIA driver loads and sees a GPU (CUDA's driver API, no torch needed)."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return [
            "no NVIDIA driver: libcuda.so.1 cannot be loaded (no GPU on this machine, or the container "
            "was started without one: docker --gpus / a Kubernetes nvidia.com/gpu limit, and the NVIDIA "
            "container toolkit on the host)"
        ]
    count = ctypes.c_int(0)
    status = libcuda.cuInit(0) or libcuda.cuDeviceGetCount(ctypes.byref(count))
    if status or count.value < 1:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
        return [
            f"the NVIDIA driver sees no GPU (CUDA driver status {status}, {count.value} devices; "
            f"CUDA_VISIBLE_DEVICES={visible})"
        ]
    return []


class Segmenter:
    """An onnxruntime session plus the normalisation its metadata prescribes."""

    def __init__(self, onnx_path: str | Path, device: str = "auto") -> None:
        self.session = open_session(onnx_path, device)
        self.provider = self.session.get_providers()[0]
        """The execution provider that runs the model (CUDAExecutionProvider or CPUExecutionProvider)."""
        meta = {k: json.loads(v) for k, v in self.session.get_modelmeta().custom_metadata_map.items()}
        if "mean" not in meta or "std" not in meta:
            raise ModelError(f"{onnx_path} lacks the mean/std metadata; export it with components.export")
        self.metadata = meta
        self.mean = np.asarray(meta["mean"], dtype=np.float32).reshape(1, 3, 1, 1) * 255
        self.std = np.asarray(meta["std"], dtype=np.float32).reshape(1, 3, 1, 1) * 255
        self.input_name = self.session.get_inputs()[0].name

    def logits(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB N x H x W x 3 -> float32 logits N x C x H x W."""
        batch = (images.transpose(0, 3, 1, 2).astype(np.float32) - self.mean) / self.std
        return self.session.run(None, {self.input_name: batch})[0]

    def masks(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB N x H x W x 3 -> uint8 trainIds N x H x W."""
        return self.logits(images).argmax(1).astype(np.uint8)


class PyfuncSegmenter:
    """What ``mlflow.pyfunc.load_model`` returns for a registered version: predict(images) -> masks."""

    def __init__(self, onnx_path: str, device: str = "auto") -> None:
        self.segmenter = Segmenter(onnx_path, device)

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        images = np.asarray(model_input)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise DataError(f"expected uint8 RGB images N x H x W x 3, got shape {images.shape}")
        return self.segmenter.masks(images.astype(np.uint8))


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> PyfuncSegmenter:
    """MLflow pyfunc loader hook; the device comes from ``model_config={"device": ...}``, else from
    ``$CITYSEG_DEVICE``, else auto."""
    device = (model_config or {}).get("device") or os.environ.get(DEVICE_ENV) or "auto"
    return PyfuncSegmenter(data_path, device)
