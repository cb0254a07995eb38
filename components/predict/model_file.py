"""Which ONNX file batch inference runs: a registered version's (downloaded once, cached per version), an
s3:// or a local file, in the precision asked for."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from components import storage
from components.errors import ModelError
from components.predict.manifest import ModelId
from components.serving import variant_path

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
    """A local ONNX file for a ``models:/`` URI (cached per version), an s3:// URI or a local path;
    ``precision`` int8 takes the variant the export stage wrote beside it (``export.int8``)."""
    if model_uri.startswith("models:/"):
        return _registered_onnx(
            model_uri, Path(cache_dir or os.environ.get("CITYSEG_CACHE") or DEFAULT_CACHE), precision
        )
    model_uri = variant_path(model_uri, precision)
    if storage.is_s3(model_uri):
        local = Path(cache_dir or DEFAULT_CACHE) / "s3" / model_uri[len("s3://") :]
        return local if local.is_file() else storage.copy_to_local(model_uri, local)
    path = Path(model_uri)
    if not path.is_file():
        raise ModelError(
            f"model {model_uri} is neither a models:/ URI nor an existing .onnx file"
            + _variant_hint(precision)
        )
    return path


def _registered_onnx(model_uri: str, cache_root: Path, precision: str) -> Path:
    # Imported here: an .onnx file needs no MLflow.
    from components.tracking.registry_read import ONNX_SUBPATH, download_registered_file

    in_model = variant_path(ONNX_SUBPATH, precision)
    return download_registered_file(model_uri, in_model, cache_root, _variant_hint(precision))


def _variant_hint(precision: str) -> str:
    if precision == "fp32":
        return ""
    return f" (the {precision} variant exists only where the export stage ran with export.{precision}=true)"
