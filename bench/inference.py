"""Inference on CPU: onnxruntime vs PyTorch eager, same weights, batch 1, latency per image.

The model is ``build_model`` with random weights (nothing to download), exported by
``components.export.export_graph`` exactly as the export stage does (dynamic batch/height/width), run with
all graph optimisations and one intra-op thread per core. Both sides get the same input; the row reports
the largest logit difference and the argmax agreement, judged by the export stage's parity thresholds.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from bench.common import Row, make_row, side_by_side
from components.config import ExportConfig, ModelConfig
from components.export import LogitsOnly, export_graph
from components.model import build_model

TARGET = ("<=", 0.8)


def bench_inference(
    work_dir: Path, *, backbone: str = "resnet50", size: tuple[int, int] = (512, 1024), repeats: int = 3
) -> Row:
    """Latency (ms per image), onnxruntime vs PyTorch eager, at ``size`` (height, width), batch 1."""
    import onnxruntime as ort

    cores = len(os.sched_getaffinity(0))
    torch.manual_seed(0)
    net = LogitsOnly(build_model(ModelConfig(backbone=backbone, weights="none"))).eval()
    export = ExportConfig()
    path = Path(work_dir) / f"deeplabv3_{backbone}_random.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    exporter = export_graph(net, path, export.opset)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = cores
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    image = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    feed = {session.get_inputs()[0].name: image.numpy()}
    outputs: dict[str, np.ndarray] = {}

    def ours() -> None:
        outputs["ours"] = session.run(None, feed)[0]

    def reference() -> None:
        with torch.inference_mode():
            outputs["reference"] = net(image).numpy()

    threads = torch.get_num_threads()
    torch.set_num_threads(cores)
    try:
        ours_s, reference_s = side_by_side(ours, reference, repeats)
    finally:
        torch.set_num_threads(threads)
    max_abs_diff = float(np.abs(outputs["ours"] - outputs["reference"]).max())
    agreement = float((outputs["ours"].argmax(1) == outputs["reference"].argmax(1)).mean())
    identical = max_abs_diff <= export.max_abs_diff and agreement >= export.min_argmax_agreement
    return make_row(
        f"inference, DeepLabv3-{backbone} {size[0]}x{size[1]} batch 1 (ORT vs PyTorch eager)",
        "ms",
        ours_s * 1000,
        reference_s * 1000,
        identical,
        TARGET,
        f"{exporter} export, opset {export.opset}, {cores} threads; max |logit diff| {max_abs_diff:.1e}, "
        f"argmax agreement {agreement:.5f}; median of {repeats}",
    )
