"""ONNX export: a real dynamo export of a tiny DeepLabv3, its metadata, and the parity gate."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from components.config import Config, load_config
from components.export import ExportResult
from components.serving import cuda_problems

# The default (dynamo) exporter, which the demo recipe swaps for the faster torchscript one.
PARITY_OVERRIDES = [
    "export.parity_sizes=[[64,128],[48,96]]",
    "export.parity_images=2",
    "export.exporter=dynamo",
]


def tiny_config(*overrides: str) -> Config:
    return load_config("demo", [*PARITY_OVERRIDES, *overrides])


def make_checkpoint(directory: Path, seed: int = 0, cfg: Config | None = None) -> str:
    """A random-init MobileNetV3 DeepLabv3 saved in the components.checkpoint format; returns its path."""
    from components.checkpoint import save_checkpoint
    from components.model import build_model

    cfg = cfg or tiny_config()
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so the logits are not all alike
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    state = {"model": model.state_dict(), "epoch": 1, "best_miou": 0.0, "config": cfg.model_dump(mode="json")}
    return save_checkpoint(state, str(directory))


def shared_export(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path) -> tuple[str, ExportResult]:
    """One real export per test run (15-40 s on CPU), shared by the model-delivery tests and, under
    pytest-xdist, by all workers (pytest-xdist's documented file-lock recipe): the checkpoint (seed 0)
    and the synthetic data (seed 0) are the same in every worker."""
    import pickle

    from filelock import FileLock

    from components.export import export_onnx

    run_temp = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # basetemp is this run's <run>/popen-gwN
        run_temp = run_temp.parent
    shared = run_temp / "shared-export"
    done = shared / "result.pickle"
    with FileLock(f"{shared}.lock"):
        if not done.is_file():
            checkpoint = make_checkpoint(shared / "ckpt")
            out = str(shared / "onnx" / "model.onnx")
            result = export_onnx(checkpoint, out, str(synthetic_root), tiny_config(), source_run_id="run-123")
            done.write_bytes(pickle.dumps((checkpoint, result)))
        return pickle.loads(done.read_bytes())


@pytest.fixture
def exported(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path) -> tuple[str, ExportResult]:
    return shared_export(tmp_path_factory, synthetic_root)


@pytest.mark.slow
def test_export_passes_gate_and_carries_metadata(exported, synthetic_root: Path) -> None:
    from components.export import read_metadata
    from components.labels import CLASS_NAMES, TRAIN_ID_TO_LABEL_ID

    checkpoint, result = exported
    path = Path(result.onnx_path)
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["model.onnx"]
    assert result.exporter == "dynamo"
    assert result.max_abs_diff <= 1e-3 and result.argmax_agreement >= 0.999
    assert [r.size for r in result.parity] == [(64, 128), (48, 96)]
    assert result.provider == ("CPUExecutionProvider" if cuda_problems() else "CUDAExecutionProvider")
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 18
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    meta = read_metadata(path)
    assert meta["class_names"] == list(CLASS_NAMES)
    assert meta["train_ids"] == list(range(19))
    assert meta["train_id_to_label_id"] == list(TRAIN_ID_TO_LABEL_ID)
    assert meta["palette"][0] == [128, 64, 128]
    assert meta["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert meta["opset"] == 18 and meta["source_run_id"] == "run-123"
    assert meta["input"]["layout"] == "NCHW" and meta["git_commit"]
    assert all(isinstance(json.loads(p.value), object) for p in model.metadata_props)

    _assert_dynamic_shapes_match_pytorch(path, checkpoint)


def _assert_dynamic_shapes_match_pytorch(onnx_path: Path, checkpoint: str) -> None:
    """A size and batch the gate never saw still matches PyTorch."""
    from components.export import LogitsOnly
    from components.model import load_model

    net = LogitsOnly(load_model(checkpoint)[0]).eval()
    images = torch.randn(3, 3, 40, 72)
    with torch.no_grad():
        expected = net(images).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    actual = session.run(None, {"image": images.numpy()})[0]
    assert actual.shape == (3, 19, 40, 72)
    assert np.abs(actual - expected).max() <= 1e-3


def test_torchscript_exporter_passes_the_same_gate(synthetic_root: Path, tmp_path: Path) -> None:
    from components.export import export_onnx, read_metadata

    checkpoint = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "onnx" / "model.onnx"
    result = export_onnx(
        checkpoint, str(out), str(synthetic_root), tiny_config("export.exporter=torchscript")
    )
    assert result.exporter == "torchscript" and read_metadata(out)["exporter"] == "torchscript"
    assert result.max_abs_diff <= 1e-3 and result.argmax_agreement >= 0.999
    _assert_dynamic_shapes_match_pytorch(out, checkpoint)


@pytest.mark.slow
def test_parity_gate_rejects_a_perturbed_model(exported, synthetic_root: Path) -> None:
    from components.errors import ExportError
    from components.export import LogitsOnly, check_parity, parity_batches
    from components.model import load_model

    checkpoint, result = exported
    net = LogitsOnly(load_model(checkpoint)[0]).eval()
    with torch.no_grad():  # weights changed after the export: the ONNX file no longer matches
        net.model.classifier[4].weight.add_(0.5 * torch.randn_like(net.model.classifier[4].weight))
    batches = parity_batches(str(synthetic_root), tiny_config())
    with pytest.raises(ExportError, match=r"max \|logit diff\| \d\.\d+e[+-]\d+ \(limit 1\.0e-03\)"):
        check_parity(Path(result.onnx_path), net, batches, 1e-3, 0.999, "fp32")


@pytest.mark.slow
def test_rejected_export_publishes_nothing(
    exported, tmp_path: Path, synthetic_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broken export (the graph of other weights than the checkpoint's): the gate must refuse it."""
    import shutil

    from components import export
    from components.errors import ExportError

    stale_graph = exported[1].onnx_path

    def broken_export_graph(net: torch.nn.Module, path: Path, opset: int, exporter: str) -> str:
        shutil.copyfile(stale_graph, path)
        return "dynamo"

    monkeypatch.setattr(export, "export_graph", broken_export_graph)
    out = tmp_path / "out" / "model.onnx"
    checkpoint = make_checkpoint(tmp_path / "ckpt", seed=1)
    with pytest.raises(ExportError, match="parity gate rejected"):
        export.export_onnx(checkpoint, str(out), str(synthetic_root), tiny_config())
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


@pytest.mark.slow
def test_int8_variant_is_gated_and_published_beside_the_fp32_file(
    tmp_path: Path, synthetic_root: Path
) -> None:
    from components.errors import ExportError
    from components.export import export_onnx, read_metadata
    from components.serving import Segmenter

    checkpoint = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out" / "model.onnx"
    # Random weights: logits nearly tie everywhere, so quantization flips more pixels than on a trained
    # model (the trained demo model passes the default 0.98: bench/README.md, int8).
    int8 = ["export.exporter=torchscript", "export.int8=true", "export.calibration_images=4"]
    result = export_onnx(
        checkpoint, str(out), str(synthetic_root), tiny_config(*int8, "export.int8_min_argmax_agreement=0.9")
    )
    assert result.int8_path == str(out.with_name("model.int8.onnx"))
    variant = Path(result.int8_path)
    assert variant.stat().st_size < 0.5 * out.stat().st_size  # int8 weights
    graph = onnx.load(str(variant)).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in graph.node}
    # MobileNetV3's 10 convolutions at 1/2 and 1/4 resolution and the logits' one stay float32: their
    # weights are float initializers, not dequantized int8 ones.
    initializers = {tensor.name: tensor.data_type for tensor in graph.initializer}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    float_convs = [n.name for n in convs if initializers.get(n.input[1]) == onnx.TensorProto.FLOAT]
    assert len(convs) == 70 and len(float_convs) == 11, float_convs
    assert float_convs[-1] == convs[-1].name and "backbone.4/block/block.0/" in float_convs[-2]
    assert [r.size for r in result.int8_parity] == [(64, 128), (48, 96)]
    assert all(0.9 <= r.argmax_agreement < 1.0 for r in result.int8_parity), result.int8_parity
    metadata = read_metadata(variant)
    assert metadata["precision"] == "int8" and metadata["mean"] == read_metadata(out)["mean"]
    images = np.random.default_rng(0).integers(0, 256, (2, 48, 96, 3), dtype=np.uint8)
    masks = Segmenter(variant, "cpu").masks(images)
    assert masks.shape == (2, 48, 96) and masks.dtype == np.uint8

    rejected = tmp_path / "rejected" / "model.onnx"
    # Gated on the CPU (where the int8 variant runs) whatever the export's device.
    expected = (
        r"rejected the int8 ONNX export \(CPUExecutionProvider\): .*argmax agreement 0\.\d+ \(minimum 1\.01\)"
    )
    with pytest.raises(ExportError, match=expected):
        export_onnx(
            checkpoint,
            str(rejected),
            str(synthetic_root),
            tiny_config(*int8, "export.int8_min_argmax_agreement=1.01"),
        )
    assert not rejected.parent.exists() or list(rejected.parent.iterdir()) == []


@pytest.mark.slow
def test_fp16_variant_is_published_and_a_stale_variant_removed(tmp_path: Path, synthetic_root: Path) -> None:
    from components.export import export_onnx, read_metadata

    checkpoint = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "out" / "model.onnx"
    fp16 = out.with_name("model.fp16.onnx")
    cfg = tiny_config("export.exporter=torchscript", "export.fp16=true")
    result = export_onnx(checkpoint, str(out), str(synthetic_root), cfg, device="cpu")
    assert (result.fp16_path, result.int8_path) == (str(fp16), None)
    assert [r.size for r in result.fp16_parity] == [(64, 128), (48, 96)]
    assert read_metadata(fp16)["precision"] == "fp16"
    assert read_metadata(fp16)["class_names"] == read_metadata(out)["class_names"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.fp16.onnx", "model.onnx"]

    # Exported again into the same folder without fp16: the old fp16 file (another model's) goes.
    out.with_name("model.int8.onnx").write_bytes(b"left by an older export")
    again = export_onnx(checkpoint, str(out), str(synthetic_root), tiny_config("export.exporter=torchscript"))
    assert again.fp16_path is None
    assert [p.name for p in out.parent.iterdir()] == ["model.onnx"]


@pytest.mark.slow
def test_fine_convs_are_found_by_output_resolution(exported) -> None:
    from components.errors import ExportError
    from components.export import fine_convs

    _, result = exported
    model = onnx.load(result.onnx_path)
    convs = [node.name for node in model.graph.node if node.op_type == "Conv"]
    # MobileNetV3-Large: the stem and 3 convolutions at 1/2; 6 more at 1/4 (64x128 input).
    assert fine_convs(model, (1, 3, 64, 128), 2) == convs[:4]
    assert fine_convs(model, (2, 3, 128, 256), 4) == convs[:10]
    assert fine_convs(model, (1, 3, 64, 128), 0) == []
    # Without the stem its output is unknown, and so is every height after it.
    model.graph.node.remove(next(node for node in model.graph.node if node.op_type == "Conv"))
    with pytest.raises(ExportError, match=r"no output height .* export.int8_float_max_stride=0"):
        fine_convs(model, (1, 3, 64, 128), 4)


def test_export_cli_help() -> None:
    from components.export import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0


@pytest.mark.slow
def test_fp16_variant_meets_its_own_bar(exported, tmp_path: Path, synthetic_root: Path) -> None:
    from components.export import LogitsOnly, check_parity, convert_fp16, parity_batches
    from components.model import load_model

    checkpoint, result = exported
    fp16 = tmp_path / "model.fp16.onnx"
    convert_fp16(Path(result.onnx_path), fp16)
    assert fp16.stat().st_size < 0.6 * Path(result.onnx_path).stat().st_size
    net = LogitsOnly(load_model(checkpoint)[0]).eval()
    cfg = tiny_config()
    reports, provider = check_parity(
        fp16, net, parity_batches(str(synthetic_root), cfg),
        cfg.export.fp16_max_abs_diff, cfg.export.fp16_min_argmax_agreement, "fp16", "cpu",
    )  # fmt: skip
    assert provider == "CPUExecutionProvider"
    assert all(0 < r.max_abs_diff <= 5e-2 and r.argmax_agreement >= 0.99 for r in reports)
