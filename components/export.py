"""ONNX export of a fine-tuned DeepLabv3 with a parity gate against PyTorch on real validation images.

The exported graph maps ``image`` (N x 3 x H x W float32, RGB, ImageNet-normalised; N, H and W dynamic)
to ``logits`` (N x num_classes x H x W). Its ``metadata_props`` (JSON strings) describe everything a
consumer needs: class names, trainIds, palette, trainId->labelId map, mean/std, input layout, opset,
exporter, source run id and git commit. The file only reaches ``out_path`` once the gate passed, and so
do the variants beside it (``model.fp16.onnx`` with ``export.fp16``, ``model.int8.onnx`` with
``export.int8``), each behind its own gate; a variant an earlier export left there is removed.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from components import storage
from components.cli import run_cli
from components.config import Config, load_config
from components.errors import ExportError
from components.labels import CLASS_NAMES, PALETTE, TRAIN_ID_TO_LABEL_ID
from components.serving import DEVICES, PRECISIONS, check_device, open_session, variant_path

logger = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
_DYNAMIC_DIMS = {0: "batch", 2: "height", 3: "width"}
_SAMPLE_SHAPE = (2, 3, 64, 128)  # batch 2: a batch-1 sample would let the exporter specialise N=1


@dataclass
class ParityReport:
    """What the gate measured for one (height, width) on real validation images."""

    size: tuple[int, int]
    images: int
    max_abs_diff: float
    argmax_agreement: float


@dataclass
class ExportResult:
    onnx_path: str
    exporter: str
    """``dynamo`` or ``torchscript`` (``export.exporter``, or the fallback when dynamo failed)."""
    opset: int
    max_abs_diff: float
    """Worst value over all parity sizes (fp32 model)."""
    argmax_agreement: float
    parity: list[ParityReport]
    metadata: dict[str, str]
    provider: str = ""
    """The onnxruntime execution provider that ran the fp32 and fp16 gates (``device``)."""
    fp16_path: str | None = None
    fp16_parity: list[ParityReport] = field(default_factory=list)
    int8_path: str | None = None
    int8_parity: list[ParityReport] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LogitsOnly(nn.Module):
    """DeepLabv3 returns a dict (``out``, ``aux``); consumers only want the ``out`` logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)["out"]


def export_onnx(
    checkpoint_uri: str,
    out_path: str,
    data_root: str,
    cfg: Config | None = None,
    *,
    source_run_id: str | None = None,
    device: str = "auto",
) -> ExportResult:
    """Export a checkpoint (path, s3:// or models:/ URI) to ONNX at ``out_path`` (local or s3://).

    ``cfg`` defaults to the checkpoint's own config; ``source_run_id`` (default: the active MLflow run)
    is recorded in the metadata; ``device`` (auto, cuda, cpu) is where onnxruntime runs the fp32 and fp16
    gates, as predict would. Raises ExportError when export fails or the parity gate rejects it.
    """
    from components.model import load_model

    check_device(device)  # device=cuda without a usable GPU fails before the (long) export
    model, saved_cfg = load_model(checkpoint_uri)
    cfg = cfg or saved_cfg
    if cfg.model.num_classes != len(CLASS_NAMES):
        raise ExportError(
            f"{checkpoint_uri} predicts {cfg.model.num_classes} classes; only Cityscapes models "
            f"({len(CLASS_NAMES)} trainIds) can be exported with Cityscapes metadata"
        )
    net = LogitsOnly(model).eval()
    batches = parity_batches(data_root, cfg)
    with tempfile.TemporaryDirectory(prefix="cityseg-export-") as tmp:
        staged = Path(tmp) / "model.onnx"
        exporter = export_graph(net, staged, cfg.export.opset, cfg.export.exporter)
        metadata = onnx_metadata(cfg, exporter, source_run_id)
        finalize(staged, metadata)
        parity, provider = check_parity(
            staged, net, batches, cfg.export.max_abs_diff, cfg.export.min_argmax_agreement, "fp32", device
        )
        result = ExportResult(
            onnx_path=str(out_path),
            exporter=exporter,
            opset=cfg.export.opset,
            max_abs_diff=max(r.max_abs_diff for r in parity),
            argmax_agreement=min(r.argmax_agreement for r in parity),
            parity=parity,
            metadata=metadata,
            provider=provider,
        )
        staged_variants: dict[str, Path] = {}
        if cfg.export.fp16:
            staged_variants["fp16"] = Path(tmp) / "model.fp16.onnx"
            convert_fp16(staged, staged_variants["fp16"])
            result.fp16_parity, _ = check_parity(
                staged_variants["fp16"],
                net,
                batches,
                cfg.export.fp16_max_abs_diff,
                cfg.export.fp16_min_argmax_agreement,
                "fp16",
                device,
            )
        if cfg.export.int8:
            staged_variants["int8"] = Path(tmp) / "model.int8.onnx"
            quantize_int8(
                staged,
                staged_variants["int8"],
                calibration_batches(data_root, cfg),
                cfg.export.int8_float_max_stride,
            )
            # Quantization shifts every logit a little; what users see is the argmax. Gated on the CPU,
            # the only place the int8 variant is meant to run.
            result.int8_parity, _ = check_parity(
                staged_variants["int8"],
                net,
                batches,
                float("inf"),
                cfg.export.int8_min_argmax_agreement,
                "int8",
                "cpu",
            )
        # Only files that passed every gate are published, model.onnx last (atomically for local paths).
        # A variant an earlier export left beside it is removed: the files there are the precisions
        # this model has, which is what predict offers.
        for precision in PRECISIONS:
            target = variant_path(str(out_path), precision)
            if precision in staged_variants:
                storage.upload(staged_variants[precision], target)
            elif precision != "fp32":
                storage.delete(target)
        result.fp16_path = variant_path(str(out_path), "fp16") if "fp16" in staged_variants else None
        result.int8_path = variant_path(str(out_path), "int8") if "int8" in staged_variants else None
        storage.upload(staged, str(out_path))
    logger.info(
        "exported %s -> %s (%s exporter, opset %d): max |diff| %.2e, argmax agreement %.5f on %s",
        checkpoint_uri,
        out_path,
        exporter,
        result.opset,
        result.max_abs_diff,
        result.argmax_agreement,
        provider,
    )
    return result


def export_graph(net: nn.Module, path: Path, opset: int, exporter: str = "dynamo") -> str:
    """Write ``net`` as ONNX with dynamic N/H/W with ``exporter`` (``dynamo`` falls back to
    ``torchscript`` if it fails); returns the exporter used."""
    sample = torch.randn(*_SAMPLE_SHAPE)
    if exporter == "dynamo":
        try:
            return _dynamo_export(net, sample, path, opset)
        except Exception as exc:  # the exporter raises many types; any of them means "try the fallback"
            logger.warning(
                "dynamo ONNX exporter failed (%s: %s); falling back to the TorchScript exporter",
                type(exc).__name__,
                exc,
            )
    try:
        torch.onnx.export(
            net,
            (sample,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: _DYNAMIC_DIMS, OUTPUT_NAME: _DYNAMIC_DIMS},
        )
    except Exception as exc:
        raise ExportError(
            f"ONNX export failed ({'both exporters' if exporter == 'dynamo' else 'torchscript exporter'}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return "torchscript"


def _dynamo_export(net: nn.Module, sample: torch.Tensor, path: Path, opset: int) -> str:
    dim = torch.export.Dim.DYNAMIC
    program = torch.onnx.export(
        net,
        (sample,),
        dynamo=True,
        opset_version=opset,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes={INPUT_NAME: dict.fromkeys(_DYNAMIC_DIMS, dim)},
        external_data=False,
        verbose=False,
    )
    program.save(str(path), external_data=False)
    return "dynamo"


def onnx_metadata(cfg: Config, exporter: str, source_run_id: str | None = None) -> dict[str, str]:
    """The ``metadata_props`` every exported model carries (values are JSON strings)."""
    from components import tracking

    if source_run_id is None:
        source_run_id = tracking.active_run_id() or ""
    fields: dict[str, Any] = {
        "class_names": list(CLASS_NAMES),
        "train_ids": list(range(len(CLASS_NAMES))),
        "palette": [list(color) for color in PALETTE],
        "train_id_to_label_id": list(TRAIN_ID_TO_LABEL_ID),
        "ignore_index": 255,
        "mean": list(cfg.augment.mean),
        "std": list(cfg.augment.std),
        "input": {
            "name": INPUT_NAME,
            "layout": "NCHW",
            "dtype": "float32",
            "channels": "RGB",
            "normalization": "(pixel / 255 - mean) / std",
        },
        "output": {"name": OUTPUT_NAME, "layout": "NCHW", "dtype": "float32", "meaning": "logits"},
        "opset": cfg.export.opset,
        "exporter": exporter,
        "backbone": cfg.model.backbone,
        "recipe": cfg.recipe,
        "source_run_id": source_run_id,
        "git_commit": tracking.git_commit(),
    }
    return {key: json.dumps(value) for key, value in fields.items()}


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The decoded ``metadata_props`` of an exported model."""
    model = onnx.load(str(path), load_external_data=False)
    return {prop.key: json.loads(prop.value) for prop in model.metadata_props}


def finalize(path: Path, metadata: dict[str, str]) -> None:
    """Name the dynamic axes, attach the metadata and run ``onnx.checker`` (full check)."""
    model = onnx.load(str(path))
    symbols: dict[str, str] = {}
    for axis, name in _DYNAMIC_DIMS.items():
        dim = model.graph.input[0].type.tensor_type.shape.dim[axis]
        symbols[dim.dim_param or name] = name
        dim.dim_param = name
    for dim in model.graph.output[0].type.tensor_type.shape.dim:
        if dim.dim_param in symbols:
            dim.dim_param = symbols[dim.dim_param]
    onnx.helper.set_model_props(model, metadata)
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"the exported ONNX graph fails onnx.checker: {exc}") from None
    onnx.save(model, str(path))


def convert_fp16(src: Path, dst: Path) -> None:
    """An fp16 copy for GPU inference; inputs and outputs stay float32 so callers need no change."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(src))
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    converted = OnnxModel(convert_float_to_float16(model, keep_io_types=True))
    converted.topological_sort()  # the converter leaves its input casts out of order
    onnx.helper.set_model_props(converted.model, {**metadata, "precision": json.dumps("fp16")})
    onnx.checker.check_model(converted.model)
    onnx.save(converted.model, str(dst))


def quantize_int8(src: Path, dst: Path, calibration: list[np.ndarray], float_max_stride: int = 4) -> None:
    """An int8 copy for CPU inference: onnxruntime's static QDQ quantization of the convolutions
    (per-channel int8 weights, uint8 activations whose MinMax ranges come from ``calibration``, batches of
    normalised images). Two kinds of convolution stay float32: those whose output is at 1/``float_max_stride``
    of the input's resolution or finer (0: none), the early high-resolution layers whose rounding errors
    the argmax is most sensitive to and which cost the least to keep, and the last one (the logits) with
    everything after it, so the upsampled logits are not rounded to 256 levels before the argmax. Inputs
    and outputs stay float32. bench/README.md has the measurements behind these choices."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    with tempfile.TemporaryDirectory(prefix="cityseg-quantize-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Constant folding and shape inference first, as onnxruntime recommends before quantization.
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        graph = onnx.load(str(prepared))
        convs = [node.name for node in graph.graph.node if node.op_type == "Conv"]
        fine = fine_convs(graph, calibration[0].shape, float_max_stride)
        quantize_static(
            str(prepared),
            str(dst),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["Conv"],
            nodes_to_exclude=[*fine, *convs[-1:]],
        )
    logger.info("int8: %d of %d convolutions stay float32", len(set(fine) | set(convs[-1:])), len(convs))
    model = onnx.load(str(dst))
    metadata = {prop.key: prop.value for prop in onnx.load(str(src)).metadata_props}
    onnx.helper.set_model_props(model, {**metadata, "precision": json.dumps("int8")})
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


def fine_convs(model: onnx.ModelProto, shape: tuple[int, ...], max_stride: int) -> list[str]:
    """The convolutions of ``model`` whose output height is at least 1/``max_stride`` of the input's, found
    by ONNX shape inference with the input fixed at ``shape`` (N, C, H, W); none when ``max_stride`` < 1."""
    if max_stride < 1:
        return []
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for dim, value in zip(fixed.graph.input[0].type.tensor_type.shape.dim, shape, strict=True):
        dim.dim_value = value  # replaces the symbolic N/H/W
    inferred = onnx.shape_inference.infer_shapes(fixed)
    heights = {
        info.name: info.type.tensor_type.shape.dim[2].dim_value
        for info in inferred.graph.value_info
        if len(info.type.tensor_type.shape.dim) == 4
    }
    convs = [node for node in inferred.graph.node if node.op_type == "Conv"]
    unknown = [node.name for node in convs if not heights.get(node.output[0])]
    if unknown:
        raise ExportError(
            f"int8: ONNX shape inference found no output height for {len(unknown)} convolutions "
            f"(first: {unknown[0]}); set export.int8_float_max_stride=0 to quantize them all"
        )
    return [node.name for node in convs if heights[node.output[0]] * max_stride >= shape[2]]


def calibration_batches(data_root: str, cfg: Config) -> list[np.ndarray]:
    """``cfg.export.calibration_images`` training images spread evenly over the split (not the first
    ones, which are all one city), one per batch, at the first parity size (activation ranges barely
    depend on resolution; the gate then checks other images and sizes)."""
    from components.data.dataset import CityscapesSegmentation
    from components.data.transforms import eval_transform

    size = cfg.export.parity_sizes[0]
    dataset = CityscapesSegmentation(data_root, "train", transform=eval_transform(cfg.augment, resize=size))
    count = min(cfg.export.calibration_images, len(dataset))
    if count < 1:
        raise ExportError(f"int8 calibration needs training images, but {data_root} has none")
    # Evenly spaced, distinct indices (count <= len(dataset)).
    return [dataset[i * (len(dataset) - 1) // max(count - 1, 1)][0][None].numpy() for i in range(count)]


def parity_batches(data_root: str, cfg: Config) -> list[tuple[tuple[int, int], torch.Tensor]]:
    """``cfg.export.parity_images`` real validation images at each of ``cfg.export.parity_sizes``."""
    from components.data.dataset import CityscapesSegmentation
    from components.data.transforms import eval_transform

    if len(cfg.export.parity_sizes) < 2 or len(set(cfg.export.parity_sizes)) < 2:
        raise ExportError(
            "export.parity_sizes must list two different (height, width) sizes, got "
            f"{cfg.export.parity_sizes}"
        )
    batches = []
    for size in cfg.export.parity_sizes:
        dataset = CityscapesSegmentation(data_root, "val", transform=eval_transform(cfg.augment, resize=size))
        count = min(cfg.export.parity_images, len(dataset))
        if count < 1:
            raise ExportError(f"the parity gate needs validation images, but {data_root} has none")
        batches.append((tuple(size), torch.stack([dataset[i][0] for i in range(count)])))
    return batches


def check_parity(
    onnx_path: Path,
    net: nn.Module,
    batches: list[tuple[tuple[int, int], torch.Tensor]],
    max_abs_diff: float,
    min_agreement: float,
    label: str,
    device: str = "auto",
) -> tuple[list[ParityReport], str]:
    """Compare onnxruntime on ``device`` with PyTorch on each batch; ExportError (with the numbers) if any
    bar fails. Returns the reports and the execution provider that ran the ONNX side."""
    # Strict fp32 on GPUs: the gate judges the exported graph, not TensorFloat-32 rounding.
    session = open_session(onnx_path, device, cuda_options={"use_tf32": "0"})
    provider = session.get_providers()[0]
    reports = []
    for size, images in batches:
        with torch.no_grad():
            expected = net(images).numpy()
        actual = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]
        if actual.shape != expected.shape:
            raise ExportError(
                f"{label} ONNX output shape {actual.shape} != PyTorch {expected.shape} at {size}"
            )
        diff = float(np.abs(actual.astype(np.float32) - expected).max())
        agreement = float((actual.argmax(1) == expected.argmax(1)).mean())
        reports.append(
            ParityReport(size=size, images=len(images), max_abs_diff=diff, argmax_agreement=agreement)
        )
        logger.info(
            "%s parity at %s on %s: max |diff| %.3e, argmax agreement %.5f",
            label,
            size,
            provider,
            diff,
            agreement,
        )
    failed = [
        r for r in reports if not (r.max_abs_diff <= max_abs_diff and r.argmax_agreement >= min_agreement)
    ]
    if failed:
        details = "; ".join(
            f"{r.size[0]}x{r.size[1]}: max |logit diff| {r.max_abs_diff:.3e} (limit {max_abs_diff:.1e}), "
            f"argmax agreement {r.argmax_agreement:.5f} (minimum {min_agreement})"
            for r in failed
        )
        raise ExportError(
            f"parity gate rejected the {label} ONNX export ({provider}): {details}. Nothing was published."
        )
    return reports, provider


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a checkpoint to ONNX, gated by a parity check.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint path, s3:// or models:/ URI")
    parser.add_argument("--out", required=True, help="output .onnx path (local or s3://)")
    parser.add_argument("--data", required=True, help="prepared dataset root (its val split feeds the gate)")
    parser.add_argument(
        "--recipe", help="recipe name/YAML whose export settings to use (default: the checkpoint's config)"
    )
    parser.add_argument("--run-id", help="source MLflow run id to record in the metadata")
    parser.add_argument(
        "--device", choices=DEVICES, default="auto", help="where onnxruntime runs the parity gate"
    )
    parser.add_argument("overrides", nargs="*", help="overrides on --recipe, e.g. export.fp16=true")
    args = parser.parse_args(argv)
    if args.overrides and not args.recipe:
        parser.error("overrides need --recipe (the recipe the checkpoint was trained with)")

    def run() -> None:
        cfg = load_config(args.recipe, args.overrides) if args.recipe else None
        result = export_onnx(
            args.checkpoint, args.out, args.data, cfg, source_run_id=args.run_id, device=args.device
        )
        print(json.dumps({k: v for k, v in result.to_dict().items() if k != "metadata"}, indent=2))

    return run_cli(run)


if __name__ == "__main__":
    raise SystemExit(main())
