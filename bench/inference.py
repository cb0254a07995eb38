"""Inference benchmarks: ONNX Runtime vs PyTorch eager on the same random-weight DeepLabv3.

* ``bench_inference``: CPU latency of the bare graph, batch 1.
* ``bench_predict_path``: CPU images/s of the whole ``components.predict`` path on full 1024x2048 frames.

GPU inference (PyTorch on CUDA) is a section of ``bench.gpu_check``.

The model is ``build_model`` with random weights (nothing to download), exported by
``components.export.export_graph`` exactly as the export stage does (dynamic batch/height/width), run with
all graph optimisations and one intra-op thread per core. Both sides get the same input; the row reports
the largest logit difference and the argmax agreement, judged by the export stage's parity thresholds. A
row whose outputs fail that check has not met its target, however fast it is (:func:`judged`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.common import Row, make_row, side_by_side
from components.config import IMAGENET_MEAN, IMAGENET_STD, ExportConfig, ModelConfig
from components.export import LogitsOnly, export_graph
from components.model import build_model
from components.serving import variant_path

TARGET = ("<=", 0.8)
PATH_TARGET = (">=", 1.5)


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
    row = make_row(
        f"inference, DeepLabv3-{backbone} {size[0]}x{size[1]} batch 1 (ORT vs PyTorch eager)",
        "ms",
        ours_s * 1000,
        reference_s * 1000,
        identical,
        TARGET,
        f"{exporter} export, opset {export.opset}, {cores} threads; max |logit diff| {max_abs_diff:.1e}, "
        f"argmax agreement {agreement:.5f}; median of {repeats}",
    )
    return judged(row)


def _random_onnx(work_dir: Path, backbone: str, exporter: str = "dynamo") -> tuple[nn.Module, Path]:
    """DeepLabv3 with random weights (seed 0), exported like the export stage, with the mean/std metadata
    that components.serving reads."""
    import onnx

    torch.manual_seed(0)
    net = LogitsOnly(build_model(ModelConfig(backbone=backbone, weights="none"))).eval()
    suffix = "" if exporter == "dynamo" else f"_{exporter}"
    path = Path(work_dir) / f"deeplabv3_{backbone}_random_meta{suffix}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        export_graph(net, path, ExportConfig().opset, exporter)
        model = onnx.load(str(path))
        onnx.helper.set_model_props(
            model, {"mean": json.dumps(IMAGENET_MEAN), "std": json.dumps(IMAGENET_STD)}
        )
        onnx.save(model, str(path))
    return net, path


def bench_predict_path(
    root: Path,
    work_dir: Path,
    *,
    backbone: str = "resnet50",
    frames: int = 2,
    repeats: int = 3,
    exporter: str = "dynamo",
    precision: str = "fp32",
) -> Row:
    """Images/s of the whole ``components.predict`` path on full frames (decode and check, normalise, ONNX,
    argmax, write trainIds + labelIds PNGs) vs a plain PyTorch eager loop doing the same on the same
    frames (cv2 decode, normalise, forward, argmax, the same two PNGs). ``exporter``: the export stage's
    default; the CI smoke test takes the faster torchscript one. ``precision`` int8: the export stage's
    int8 variant (``export.int8``), calibrated on training frames at half size, judged by its own
    argmax bar."""
    import shutil
    import tempfile

    import cv2

    from components.labels import trainid_to_labelid_lut
    from components.predict import segment_inputs

    net, onnx_path = _random_onnx(work_dir, backbone, exporter)
    sources = sorted((Path(root) / "leftImg8bit" / "val").rglob("*.png"))[:frames]
    if precision == "int8":
        _make_int8_variant(onnx_path, root)
    folder = Path(work_dir) / f"frames{frames}"
    folder.mkdir(parents=True, exist_ok=True)
    for source in sources:
        if not (folder / source.name).is_file():
            shutil.copy(source, folder / source.name)
    height, width = cv2.imread(str(sources[0])).shape[:2]
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    lut = trainid_to_labelid_lut()
    masks: dict[str, list[np.ndarray]] = {}

    def ours() -> None:
        with tempfile.TemporaryDirectory(dir=work_dir) as out:
            segment_inputs(
                str(onnx_path),
                str(folder),
                out,
                batch_size=1,
                overlays=False,
                progress=False,
                precision=precision,
            )
            masks["ours"] = [
                cv2.imread(str(Path(out, "trainIds", p.name)), cv2.IMREAD_UNCHANGED) for p in sources
            ]

    def reference() -> None:
        with tempfile.TemporaryDirectory(dir=work_dir) as out:
            masks["reference"] = []
            for path in sorted(folder.glob("*.png")):
                rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
                batch = (torch.from_numpy(rgb).permute(2, 0, 1)[None].float() - mean) / std
                with torch.inference_mode():
                    mask = net(batch).argmax(1)[0].to(torch.uint8).numpy()
                cv2.imwrite(str(Path(out, f"{path.stem}_trainIds.png")), mask)
                cv2.imwrite(str(Path(out, f"{path.stem}_labelIds.png")), lut[mask])
                masks["reference"].append(mask)

    cores = len(os.sched_getaffinity(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(cores)
    try:
        ours_s, reference_s = side_by_side(ours, reference, repeats)
    finally:
        torch.set_num_threads(threads)
    agreement = float(
        np.mean([(a == b).mean() for a, b in zip(masks["ours"], masks["reference"], strict=True)])
    )
    bar = (
        ExportConfig().int8_min_argmax_agreement
        if precision == "int8"
        else ExportConfig().min_argmax_agreement
    )
    row = make_row(
        f"inference, predict path {precision}, DeepLabv3-{backbone} {height}x{width} frames "
        "(vs PyTorch eager fp32 loop)",
        "images/s",
        len(sources) / ours_s,
        len(sources) / reference_s,
        agreement >= bar,
        PATH_TARGET if precision == "int8" else None,
        f"{len(sources)} PNG frames, batch 1, {cores} threads, PNG decode+check+write included; "
        f"argmax agreement {agreement:.5f} (bar {bar}; random weights: logits nearly tie); "
        f"median of {repeats}",
    )
    return judged(row)


def judged(row: Row) -> Row:
    """``row`` with ``met`` false when its output check failed: speed with wrong outputs meets nothing."""
    if row.identical is False and row.met:
        row.met = False
        row.notes += "; target not met: the output check failed"
    return row


def _make_int8_variant(onnx_path: Path, root: Path) -> None:
    """The int8 variant beside ``onnx_path``, made as the export stage makes it (its default
    ``export.int8_float_max_stride``): calibrated by components.export.calibration_batches on 4 training
    frames at 512x1024 (half the bench's frames). Made anew every run: a variant left by an earlier run
    may come from other quantization settings."""
    from components.config import Config
    from components.export import calibration_batches, quantize_int8

    cfg = Config.model_validate(
        {"export": {"parity_sizes": [(512, 1024), (256, 512)], "calibration_images": 4}}
    )
    quantize_int8(
        onnx_path,
        Path(variant_path(str(onnx_path), "int8")),
        calibration_batches(str(root), cfg),
        cfg.export.int8_float_max_stride,
    )
