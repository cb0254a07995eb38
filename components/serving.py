"""The lean half of inference: an ONNX session that turns uint8 RGB images into trainId masks.

This module is the ``python_function`` loader of registered models (``loader_module:
components.serving``). The registered model bundles only this file, ``components/labels.py`` (plain data)
and ``components/errors.py`` in its ``code/``, and declares only what they import: mlflow-skinny,
onnxruntime (swap in onnxruntime-gpu at serve time for CUDA), numpy and pandas (MLflow's scoring server).
Keep it that way: no torch, cityscapesscripts, pydantic, OpenCV or other ``components`` imports here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from components.errors import DataError, ModelError

SERVING_REQUIREMENTS = ("mlflow-skinny", "onnxruntime", "numpy", "pandas")
"""What the served model imports (pandas: MLflow's scoring server parses requests with it)."""
BUNDLED_MODULES = ("__init__.py", "errors.py", "labels.py", "serving.py")
"""The files of ``components/`` that a registered model carries in its ``code/components/``."""

PRECISIONS = ("fp32", "fp16", "int8")
"""ONNX variants the export stage can write beside ``model.onnx`` (fp16 for GPUs, int8 for CPUs)."""


def variant_path(onnx_path: str, precision: str) -> str:
    """``model.onnx`` -> ``model.<precision>.onnx`` (beside it); fp32 is the file itself."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return onnx_path
    stem = onnx_path[: -len(".onnx")] if onnx_path.endswith(".onnx") else onnx_path
    return f"{stem}.{precision}.onnx"


class Segmenter:
    """An onnxruntime session plus the normalisation its metadata prescribes."""

    def __init__(self, onnx_path: str | Path, providers: list[str] | None = None) -> None:
        available = ort.get_available_providers()
        providers = providers or [
            p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available
        ]
        try:
            self.session = ort.InferenceSession(str(onnx_path), providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors for unreadable models
            raise ModelError(f"cannot load ONNX model {onnx_path}: {exc}") from None
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

    def __init__(self, onnx_path: str) -> None:
        self.segmenter = Segmenter(onnx_path)

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        images = np.asarray(model_input)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise DataError(f"expected uint8 RGB images N x H x W x 3, got shape {images.shape}")
        return self.segmenter.masks(images.astype(np.uint8))


def _load_pyfunc(data_path: str) -> PyfuncSegmenter:
    """MLflow pyfunc loader hook."""
    return PyfuncSegmenter(data_path)
