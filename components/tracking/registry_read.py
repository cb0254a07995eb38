"""Reading the MLflow Model Registry: resolve ``models:/`` URIs, load a registered version's weights and
config, download its files.

A ``models:/name@alias`` URI is resolved to one version first; everything after reads that version, so
the weights, the config and the files come from one version even if the alias moves meanwhile.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.utils.models import get_model_name_and_version

from components import storage
from components.errors import MLFLOW_NOT_FOUND_CODES, ModelError

logger = logging.getLogger(__name__)

ONNX_SUBPATH = "onnx/model.onnx"
"""Where the ONNX file sits inside a registered model's artifacts."""


def registered_version(model_uri: str) -> tuple[str, str]:
    """(name, version) of a ``models:/name@alias`` or ``models:/name/version`` URI. An unknown alias or
    model is a ModelError that lists what the registry does have."""
    client = mlflow.MlflowClient()
    try:
        resolved = get_model_name_and_version(client, model_uri)
    except MlflowException as exc:
        raise ModelError(
            f"cannot resolve {model_uri} in the MLflow registry at {mlflow.get_tracking_uri()}: "
            f"{exc.message.rstrip('.')}. {_registry_hint(client, model_uri, exc.error_code)}"
        ) from None
    if len(resolved) != 2:  # models:/m-<id> names a logged model, not a registered version
        raise ModelError(f"{model_uri} is not a registered version: use models:/name@alias or name/version")
    name, version = resolved
    return name, str(version)


def _registry_hint(client: Any, model_uri: str, error_code: str) -> str:
    """What the registry has for the URI's model name (its aliases, else the model names), asked only when
    it answered "no such thing": an unreachable registry is not asked again."""
    unreachable = "Check MLFLOW_TRACKING_URI and that the server is up."
    if error_code not in MLFLOW_NOT_FOUND_CODES:
        return unreachable
    name = model_uri[len("models:/") :].split("@", 1)[0].split("/", 1)[0]
    try:
        models = {model.name: model.aliases for model in client.search_registered_models()}
    except MlflowException:
        return unreachable
    if name not in models:
        return f"Registered models: {', '.join(sorted(models)) or 'none'}."
    listed = ", ".join(f"@{alias} (version {version})" for alias, version in sorted(models[name].items()))
    return f"Aliases of {name}: {listed or 'none'}; or use models:/{name}/<version>."


def _download_through_the_server() -> None:
    """Make this process's registry downloads go through the tracking server unless the user chose
    otherwise.

    MLflow 3 clients ask a server that proxies an S3 store (``--serve-artifacts``) for presigned URLs and
    download from the store directly. Those URLs carry the store's address as the *server* reaches it
    (``http://seaweedfs:8333`` in infra/docker-compose.yml), which hosts outside the server's network
    cannot resolve: the download then hangs in retries. Proxied downloads need no route to the store
    and no S3 keys; ``MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD=true`` brings the direct path back where
    the store is reachable."""
    os.environ.setdefault("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")


def load_registered_pytorch(model_uri: str, map_location: Any = "cpu") -> tuple[Any, dict[str, Any]]:
    """A registered version's pytorch-flavour model and its source run's ``config.yaml`` (as a dict)."""
    name, version = registered_version(model_uri)
    _download_through_the_server()
    client = mlflow.MlflowClient()
    try:
        run_id = client.get_model_version(name, version).run_id
        # By version, not alias: the weights and config.yaml must come from one version even if the
        # alias moves meanwhile. MLflow downloads the whole model folder (ONNX files too) to a temp
        # folder it never removes unless given one: the weights are in memory once loaded.
        with tempfile.TemporaryDirectory(prefix="cityseg-model-") as scratch:
            logged = mlflow.pytorch.load_model(
                f"models:/{name}/{version}", dst_path=scratch, map_location=map_location
            )
        config = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml"))
    except MlflowException as exc:
        raise ModelError(
            f"cannot load {model_uri} from the MLflow registry at {mlflow.get_tracking_uri()}: "
            f"{exc.message}. Check the name/alias/version and MLFLOW_TRACKING_URI."
        ) from None
    return logged, config


def list_registered_files(model_uri: str, folder: str) -> list[str]:
    """Names of the files directly in ``folder`` (e.g. ``onnx``) of the registered version ``model_uri``
    names, sorted. Listing works for every version, including those registered before the version tags
    that describe them existed."""
    name, version = registered_version(model_uri)
    _download_through_the_server()
    client = mlflow.MlflowClient()
    try:
        source = client.get_model_version_download_uri(name, version).rstrip("/")
        listed = mlflow.artifacts.list_artifacts(artifact_uri=f"{source}/{folder}")
    except MlflowException as exc:
        raise ModelError(
            f"cannot list {folder}/ of {model_uri} in {mlflow.get_tracking_uri()}: {exc.message}. "
            "Check the name/alias/version and MLFLOW_TRACKING_URI."
        ) from None
    return sorted(Path(info.path).name for info in listed if not info.is_dir)


def download_registered_file(model_uri: str, in_model: str, cache_root: Path) -> Path:
    """The file ``in_model`` (a path inside the registered model's artifacts, e.g. ``onnx/model.onnx``) of
    the version ``model_uri`` names, cached at ``<cache_root>/<name>/<version>/<file name>``."""
    name, version = registered_version(model_uri)
    _download_through_the_server()
    cached = cache_root / name / version / Path(in_model).name
    if cached.is_file():
        return cached
    client = mlflow.MlflowClient()
    try:
        source = client.get_model_version_download_uri(name, version).rstrip("/")
        with tempfile.TemporaryDirectory(prefix="cityseg-download-") as tmp:
            downloaded = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{source}/{in_model}", dst_path=tmp
            )
            storage.copy_to_local(downloaded, cached)
    except MlflowException as exc:
        raise ModelError(
            f"cannot get {in_model} of {model_uri} from {mlflow.get_tracking_uri()}: "
            f"{exc.message}. Check the name/alias/version and MLFLOW_TRACKING_URI."
        ) from None
    logger.info("%s is %s version %s (cached at %s)", model_uri, name, version, cached)
    return cached
