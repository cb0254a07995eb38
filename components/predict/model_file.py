"""Which ONNX file batch inference runs: a registered version's (downloaded once, cached per version), an
s3:// or a local file, in a precision the model has (``available_precisions``; anything else is a
ModelError that lists what it does have, raised before anything is downloaded)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from components import storage
from components.errors import ModelError
from components.predict.manifest import ModelId
from components.serving import PRECISIONS, variant_path

DEFAULT_CACHE = Path.home() / ".cache" / "cityseg-ops"


def resolve_model(
    model_uri: str, cache_dir: str | None = None, precision: str = "fp32"
) -> tuple[Path, ModelId]:
    """A local ONNX file and the name/version/precision the manifest records for it."""
    path = resolve_onnx(model_uri, cache_dir, precision)
    if model_uri.startswith("models:/"):
        return path, ModelId(path.parent.parent.name, path.parent.name, precision)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return path, ModelId(model_uri, digest, precision)


def resolve_onnx(model_uri: str, cache_dir: str | None = None, precision: str = "fp32") -> Path:
    """A local ONNX file for a ``models:/`` URI (cached per version), an s3:// URI or a local path, in
    ``precision``: ``model.onnx`` for fp32, the ``model.<precision>.onnx`` the export stage wrote beside
    it (``export.fp16``, ``export.int8``) otherwise. A precision the model lacks is a ModelError."""
    _check_precision(precision)
    if model_uri.startswith("models:/"):
        return _registered_onnx(
            model_uri, Path(cache_dir or os.environ.get("CITYSEG_CACHE") or DEFAULT_CACHE), precision
        )
    chosen = variant_path(model_uri, precision)
    if not storage.is_s3(chosen):
        if not Path(chosen).is_file():
            raise _missing_file(model_uri, precision)
        return Path(chosen)
    local = Path(cache_dir or DEFAULT_CACHE) / "s3" / chosen[len("s3://") :]
    if local.is_file():
        return local
    if not storage.exists(chosen):
        raise _missing_file(model_uri, precision)
    return storage.copy_to_local(chosen, local)


def available_precisions(model_uri: str) -> list[str]:
    """The precisions (in :data:`~components.serving.PRECISIONS` order) a model has: the ``onnx/`` files
    of the registered version a ``models:/`` URI names, else the ``model[.<precision>].onnx`` files that
    exist beside a local or s3:// ``.onnx`` (empty when the file itself does not exist)."""
    if model_uri.startswith("models:/"):
        # Imported here: an .onnx file needs no MLflow.
        from components.tracking.registry_read import ONNX_SUBPATH, list_registered_files

        folder, _, _ = ONNX_SUBPATH.rpartition("/")
        names = set(list_registered_files(model_uri, folder))
        return [p for p in PRECISIONS if variant_path(ONNX_SUBPATH, p).rpartition("/")[2] in names]
    if not storage.exists(model_uri):
        return []
    return [p for p in PRECISIONS if p == "fp32" or storage.exists(variant_path(model_uri, p))]


def _registered_onnx(model_uri: str, cache_root: Path, precision: str) -> Path:
    from components.tracking.registry_read import ONNX_SUBPATH, download_registered_file

    pinned, _ = _pin_registered(model_uri, precision)
    return download_registered_file(pinned, variant_path(ONNX_SUBPATH, precision), cache_root)


def _pin_registered(model_uri: str, precision: str) -> tuple[str, ModelId]:
    """``models:/name/<version>`` for a registered model URI (one version from here on: an alias that
    moves meanwhile must not mix two versions' files) once that version is known to have ``precision``."""
    from components.tracking.registry_read import registered_version

    name, version = registered_version(model_uri)
    pinned = f"models:/{name}/{version}"
    available = available_precisions(pinned)
    if precision not in available:
        label = model_uri if model_uri == pinned else f"{model_uri} (version {version})"
        raise ModelError(_missing_variant(label, precision, available))
    return pinned, ModelId(name, version, precision)


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ModelError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def _missing_file(model_uri: str, precision: str) -> ModelError:
    """The error for a local or s3:// model whose ``precision`` file does not exist."""
    if precision == "fp32" or not storage.exists(model_uri):
        return ModelError(f"model {model_uri} is neither a models:/ URI nor an existing .onnx file")
    return ModelError(_missing_variant(model_uri, precision, available_precisions(model_uri)))


def _missing_variant(model: str, precision: str, available: list[str]) -> str:
    return (
        f"{model} has no {precision} variant; it has: {', '.join(available) or 'no ONNX file'}; "
        f"export with export.{precision}=true to add one"
    )


def pin_model(model_uri: str, precision: str = "fp32") -> tuple[str, ModelId]:
    """The URI every shard of a run uses (``models:/name@alias`` -> ``models:/name/<version>``, so an alias
    that moves meanwhile does not mix versions) and what the manifest records for it, after checking that
    the model has ``precision``; a registered model's file is not downloaded here (the shards do that)."""
    _check_precision(precision)
    if not model_uri.startswith("models:/"):
        return model_uri, resolve_model(model_uri, precision=precision)[1]
    return _pin_registered(model_uri, precision)
