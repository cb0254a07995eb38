"""Inference benchmarks: ONNX Runtime vs PyTorch eager on the same random-weight DeepLabv3.

* ``bench_inference``: CPU latency of the bare graph, batch 1.
* ``bench_predict_path``: CPU images/s of the whole ``components.predict`` path on full 1024x2048 frames.
* ``bench_inference_gpu``: GPU images/s, ONNX fp32/fp16 (CUDA EP, TensorRT EP if present) vs eager
  fp32/bf16 at batch 1 and 8 ("not run" without a GPU). Anchor: mmsegmentation's DeepLabv3-R50 runs
  2.57 images/s at 1024x2048 on a V100 in fp32; the goal is >= 30 images/s on an H100-class GPU with
  >= 99.5% argmax agreement vs fp32.


The model is ``build_model`` with random weights (nothing to download), exported by
``components.export.export_graph`` exactly as the export stage does (dynamic batch/height/width), run with
all graph optimisations and one intra-op thread per core. Both sides get the same input; the row reports
the largest logit difference and the argmax agreement, judged by the export stage's parity thresholds.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.common import Row, make_row, not_run, side_by_side
from components.config import IMAGENET_MEAN, IMAGENET_STD, ExportConfig, ModelConfig
from components.export import LogitsOnly, export_graph
from components.model import build_model
from components.serving import variant_path

TARGET = ("<=", 0.8)
PATH_TARGET = (">=", 1.5)
GPU_GOAL = 30.0
"""images/s at 1024x2048 on an H100-class GPU."""
GPU_MIN_AGREEMENT = 0.995


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
    return make_row(
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


def _make_int8_variant(onnx_path: Path, root: Path) -> None:
    """The int8 variant beside ``onnx_path``, made as the export stage makes it: calibrated by
    components.export.calibration_batches on 4 training frames at 512x1024 (half the bench's frames)."""
    from components.config import Config
    from components.export import calibration_batches, quantize_int8

    int8_path = Path(variant_path(str(onnx_path), "int8"))
    if not int8_path.is_file():
        cfg = Config.model_validate(
            {"export": {"parity_sizes": [(512, 1024), (256, 512)], "calibration_images": 4}}
        )
        quantize_int8(onnx_path, int8_path, calibration_batches(str(root), cfg))


def bench_inference_gpu(
    work_dir: Path, *, backbone: str = "resnet50", size: tuple[int, int] = (1024, 2048), repeats: int = 10
) -> list[Row]:
    """GPU throughput at batch 1 and 8: ONNX fp32/fp16 on the CUDA execution provider (and TensorRT if
    the onnxruntime wheel has it) vs PyTorch eager fp32 and bf16; parity = argmax agreement with eager
    fp32 on the same random-weight network and inputs."""
    what = f"GPU inference, DeepLabv3-{backbone} {size[0]}x{size[1]}"
    if not torch.cuda.is_available():
        return [not_run(what, "images/s", "no GPU lent", f">= {GPU_GOAL:g} images/s")]
    import onnxruntime as ort

    from components.export import convert_fp16

    net, fp32_path = _random_onnx(work_dir, backbone)
    fp16_path = fp32_path.with_name(fp32_path.stem + "_fp16.onnx")
    if not fp16_path.is_file():
        convert_fp16(fp32_path, fp16_path)
    net = net.cuda()
    available = ort.get_available_providers()
    variants = {
        "ONNX fp32 CUDA EP": (fp32_path, "CUDAExecutionProvider"),
        "ONNX fp16 CUDA EP": (fp16_path, "CUDAExecutionProvider"),
    }
    if "TensorrtExecutionProvider" in available:
        variants["ONNX fp16 TensorRT EP"] = (fp16_path, "TensorrtExecutionProvider")
    rows = []
    for batch_size in (1, 8):
        images = torch.randn(batch_size, 3, *size, generator=torch.Generator().manual_seed(0))
        gpu_images = images.cuda()

        def eager(dtype: torch.dtype | None, gpu_images: torch.Tensor = gpu_images) -> np.ndarray:
            with (
                torch.inference_mode(),
                torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None),
            ):
                out = net(gpu_images).argmax(1)
            torch.cuda.synchronize()
            return out.cpu().numpy()

        baseline_s, reference = _timed(lambda: eager(None), repeats)
        runs = {"PyTorch eager bf16": _timed(lambda: eager(torch.bfloat16), repeats)}
        for name, (path, provider) in variants.items():
            session = ort.InferenceSession(str(path), providers=[provider, "CPUExecutionProvider"])
            feed = {session.get_inputs()[0].name: images.numpy()}
            runs[name] = _timed(
                lambda session=session, feed=feed: session.run(None, feed)[0].argmax(1), repeats
            )
        for name, (seconds, pred) in runs.items():
            agreement = float((pred == reference).mean())
            rows.append(
                make_row(
                    f"{what} batch {batch_size}: {name} (vs PyTorch eager fp32)",
                    "images/s",
                    batch_size / seconds,
                    batch_size / baseline_s,
                    agreement >= GPU_MIN_AGREEMENT,
                    None,
                    f"{torch.cuda.get_device_name()}; argmax agreement vs fp32 {agreement:.5f} "
                    f"(goal >= {GPU_MIN_AGREEMENT}, >= {GPU_GOAL:g} images/s); median of {repeats}, "
                    "host<->device copies included",
                )
            )
    return rows


def _timed(call: Callable[[], np.ndarray], repeats: int) -> tuple[float, np.ndarray]:
    """(median seconds, last result) after one warm-up call."""
    result = call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result
