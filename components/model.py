"""torchvision DeepLabv3 for Cityscapes: build it from the config, load it back from any model URI.

``model.weights`` is one of
  * ``DEFAULT`` - torchvision's COCO-with-VOC-labels weights (21 classes); the heads' last layers are
    replaced by fresh ``num_classes`` convolutions unless ``num_classes`` is 21 (the zero-shot baseline
    keeps the VOC head);
  * ``none`` - random initialisation, nothing is downloaded (not even the ImageNet backbone);
  * a checkpoint path / ``s3://`` URI (components.checkpoint format) or a ``models:/name@alias`` /
    ``models:/name/version`` URI: start from that model's weights (fine-tuning).

A ``models:/`` URI is resolved through the MLflow registry
(:func:`components.tracking.registry_read.load_registered_pytorch`): the registered version's pytorch-flavour
model, and its Config from the ``config.yaml`` artifact of the version's source run
(``components.tracking.mlflow_run`` logs it in every run).
"""

from __future__ import annotations

import argparse
import logging
import urllib.error
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import segmentation

from components.checkpoint import load_checkpoint
from components.config import Config, ModelConfig, config_from_dict, load_config
from components.errors import ModelError

logger = logging.getLogger(__name__)

_BUILDERS = {
    "resnet50": (segmentation.deeplabv3_resnet50, segmentation.DeepLabV3_ResNet50_Weights),
    "resnet101": (segmentation.deeplabv3_resnet101, segmentation.DeepLabV3_ResNet101_Weights),
    "mobilenet_v3_large": (
        segmentation.deeplabv3_mobilenet_v3_large,
        segmentation.DeepLabV3_MobileNet_V3_Large_Weights,
    ),
}
_AUX_PREFIX = "aux_classifier."


def build_model(model: ModelConfig) -> nn.Module:
    """A DeepLabv3 whose forward returns ``{"out": logits}`` (plus ``"aux"`` when ``model.aux_loss``)."""
    builder, weights_enum = _BUILDERS[model.backbone]
    if model.weights.upper() == "DEFAULT":
        weights = weights_enum.DEFAULT
        net = _download_guard(weights, lambda: builder(weights=weights, weights_backbone=None))
        if model.num_classes != len(weights.meta["categories"]):
            _replace_heads(net, model.num_classes)
        if not model.aux_loss:
            net.aux_classifier = None
        return net
    net = builder(weights=None, weights_backbone=None, num_classes=model.num_classes, aux_loss=model.aux_loss)
    if model.weights.lower() != "none":
        _load_initial_weights(net, model)
    return net


def load_model(uri: str, map_location: str | torch.device = "cpu") -> tuple[nn.Module, Config]:
    """A trained model from a checkpoint path, ``s3://`` URI or ``models:/`` URI, in eval mode."""
    if uri.startswith("models:/"):
        net, cfg = _load_registered(uri, map_location)
    else:
        state, cfg = _checkpoint_state(uri, map_location)
        net = build_model(cfg.model.model_copy(update={"weights": "none"}))
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise ModelError(f"checkpoint {uri} does not match its own saved config: {exc}") from None
    return net.to(map_location).eval(), cfg


def pretrained_categories(backbone: str) -> list[str]:
    """Class names of torchvision's pretrained head for this backbone (VOC: background, aeroplane, ...)."""
    return list(_BUILDERS[backbone][1].DEFAULT.meta["categories"])


def _replace_heads(net: nn.Module, num_classes: int) -> None:
    """Fresh last layers for our classes; the rest of both heads keeps its pretrained weights."""
    for head in (net.classifier, net.aux_classifier):
        if head is not None:
            old = head[4]
            head[4] = nn.Conv2d(old.in_channels, num_classes, kernel_size=1)


def _download_guard(weights: Any, build: Any) -> nn.Module:
    """Run ``build``; turn an offline download failure into a ModelError that says where the file goes."""
    try:
        return build()
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        target = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise ModelError(
            f"cannot get the pretrained weights {weights} ({exc}). Download {weights.url} and put it at "
            f"{target} (torch hub cache; set TORCH_HOME to move it), or set model.weights=none"
        ) from None


def _load_initial_weights(net: nn.Module, model: ModelConfig) -> None:
    """Initialise from another model; it must have the same backbone and number of classes."""
    if model.weights.startswith("models:/"):
        source, source_cfg = _load_registered(model.weights, "cpu")
        state = source.state_dict()
    else:
        state, source_cfg = _checkpoint_state(model.weights, "cpu")
    source_model = source_cfg.model
    if (source_model.backbone, source_model.num_classes) != (model.backbone, model.num_classes):
        raise ModelError(
            f"model.weights={model.weights} is a {source_model.backbone} with {source_model.num_classes} "
            f"classes, but the config asks for a {model.backbone} with {model.num_classes} classes; "
            "use a matching checkpoint or change model.backbone/model.num_classes"
        )
    target_keys = set(net.state_dict())
    # The auxiliary head is training-only: drop it or keep it freshly initialised, as the config says.
    state = {k: v for k, v in state.items() if k in target_keys or not k.startswith(_AUX_PREFIX)}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(_AUX_PREFIX) for k in missing):
        raise ModelError(
            f"model.weights={model.weights} does not fit: missing {missing}, unexpected {unexpected}"
        )
    if missing:
        logger.warning("%s has no auxiliary head; it starts freshly initialised", model.weights)


def _checkpoint_state(uri: str, map_location: str | torch.device) -> tuple[dict[str, Any], Config]:
    ckpt = load_checkpoint(uri, map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ModelError(f"{uri} is not a cityseg checkpoint: it needs 'model' and 'config' entries")
    return ckpt["model"], config_from_dict(ckpt["config"])


def _load_registered(uri: str, map_location: str | torch.device) -> tuple[nn.Module, Config]:
    from components.tracking.registry_read import load_registered_pytorch

    logged, config = load_registered_pytorch(uri, map_location)
    cfg = config_from_dict(config)
    # Rebuild from the config and copy the weights: a pickled module and a "pt2" export (a graph traced
    # at one input size) both become the same plain DeepLabv3 that accepts any image size.
    net = build_model(cfg.model.model_copy(update={"weights": "none"}))
    try:
        net.load_state_dict(logged.state_dict())
    except (AttributeError, RuntimeError) as exc:
        raise ModelError(f"{uri} is not a DeepLabv3 matching its run's config.yaml: {exc}") from None
    return net, cfg


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a DeepLabv3 (or load one) and print its size.")
    parser.add_argument("--recipe", default="strong", help="recipe name or YAML path")
    parser.add_argument("--uri", help="load this checkpoint / s3:// / models:/ URI instead of building")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.weights=none")
    args = parser.parse_args(argv)
    if args.uri:
        net, cfg = load_model(args.uri)
    else:
        cfg = load_config(args.recipe, args.overrides)
        net = build_model(cfg.model)
    params = sum(p.numel() for p in net.parameters())
    print(f"DeepLabv3-{cfg.model.backbone}, {cfg.model.num_classes} classes, {params / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
