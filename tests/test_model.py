"""build_model / load_model: backbones, head replacement, offline weights, checkpoint round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from components.checkpoint import save_checkpoint
from components.config import Config, load_config
from components.errors import ModelError
from components.model import build_model, load_model


def _demo(*overrides: str) -> Config:
    return load_config("demo", ["model.weights=none", *overrides])


@pytest.mark.parametrize("backbone", ["mobilenet_v3_large", "resnet50"])
def test_backbone_forward_shapes(backbone: str) -> None:
    torch.manual_seed(0)
    model = build_model(_demo(f"model.backbone={backbone}").model).eval()
    with torch.no_grad():
        output = model(torch.randn(1, 3, 64, 96))
    assert output["out"].shape == (1, 19, 64, 96)
    assert output["aux"].shape == (1, 19, 64, 96)


def test_resnet101_heads_and_no_aux() -> None:
    model = build_model(_demo("model.backbone=resnet101", "model.num_classes=7").model)
    assert model.classifier[4].out_channels == 7
    assert model.aux_classifier[4].out_channels == 7
    assert sum(p.numel() for p in model.backbone.parameters()) > 40e6  # really a ResNet-101
    without_aux = build_model(_demo("model.aux_loss=false").model)
    assert without_aux.aux_classifier is None


def test_default_weights_offline_name_the_cache_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An empty hub cache and an unreachable proxy: the download must fail even on a networked machine.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(ModelError) as error:
        build_model(_demo("model.weights=DEFAULT").model)
    expected = tmp_path / "hub" / "checkpoints" / "deeplabv3_mobilenet_v3_large-fc3c493d.pth"
    assert str(expected) in str(error.value)
    assert "model.weights=none" in str(error.value)


def _checkpoint(tmp_path: Path, cfg: Config) -> tuple[str, torch.nn.Module]:
    torch.manual_seed(1)
    model = build_model(cfg.model)
    state = {"model": model.state_dict(), "config": cfg.model_dump(mode="json"), "epoch": 1}
    return save_checkpoint(state, str(tmp_path / "ckpt")), model.eval()


def test_load_model_round_trip(tmp_path: Path) -> None:
    cfg = _demo("model.num_classes=5")
    uri, original = _checkpoint(tmp_path, cfg)
    loaded, loaded_cfg = load_model(uri)
    assert loaded_cfg == cfg
    assert not loaded.training
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(image)["out"], original(image)["out"])


def test_weights_from_checkpoint_and_mismatches_refused(tmp_path: Path) -> None:
    uri, original = _checkpoint(tmp_path, _demo())
    started = build_model(_demo(f"model.weights={uri}", "model.aux_loss=false").model)
    assert torch.equal(started.classifier[4].weight, original.classifier[4].weight)
    assert started.aux_classifier is None

    with pytest.raises(ModelError, match=r"mobilenet_v3_large with 19 classes.*mobilenet_v3_large with 5"):
        build_model(_demo(f"model.weights={uri}", "model.num_classes=5").model)
    with pytest.raises(ModelError, match=r"mobilenet_v3_large with 19 classes.*resnet50 with 19"):
        build_model(_demo(f"model.weights={uri}", "model.backbone=resnet50").model)


@pytest.mark.slow
def test_load_model_from_the_mlflow_registry(tmp_path: Path) -> None:
    import mlflow

    from components.tracking import mlflow_run

    cfg = _demo("tracking.system_metrics=false", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    torch.manual_seed(2)
    original = build_model(cfg.model).eval()
    # As the registry logs it: the pytorch flavour in a run that also holds config.yaml.
    with mlflow_run(cfg, "register"):
        mlflow.pytorch.log_model(
            original,
            name="model",
            registered_model_name="seg",
            pip_requirements=[],
            serialization_format="pickle",
        )
    mlflow.MlflowClient().set_registered_model_alias("seg", "champion", 1)

    loaded, loaded_cfg = load_model("models:/seg@champion")
    assert loaded_cfg == cfg and not loaded.training
    image = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(loaded(image)["out"], original(image)["out"])
    with pytest.raises(ModelError, match="models:/seg/7"):
        load_model("models:/seg/7")
