"""Writing the MLflow Model Registry: log a version (the segmenter flavour), register it, and set its
aliases through the promotion gate; network failures are retried (:func:`retry`).

What a registered version is (``components/registry.py`` is the step that calls in here): one MLflow
model, ``segmenter``, logged in the *training* run with
  * the ``pytorch`` flavour (``mlflow.pytorch.load_model`` -> the torchvision DeepLabV3, dict output),
  * a ``python_function`` flavour backed by the ONNX file (``onnx/model.onnx``) that returns **masks**:
    ``mlflow.pyfunc.load_model(uri).predict(images)`` takes uint8 RGB images (N x H x W x 3) and returns
    uint8 trainIds (N x H x W), so ``mlflow models serve -m models:/cityscapes-deeplabv3@champion``
    works as is (loader: ``components.serving``; the model's ``code/`` holds only the lean serving
    modules and its requirements.txt only mlflow-skinny, onnxruntime, numpy, pandas: no torch),
  * the ONNX file itself, which ``python -m components.predict --model models:/...`` downloads, and the
    variants the export stage wrote and gated beside it (``onnx/model.fp16.onnx`` with ``export.fp16``,
    ``onnx/model.int8.onnx`` with ``export.int8``) for ``--precision``; the version's ``onnx_variants``
    tag lists them (e.g. ``fp32,int8``); ``components.predict.model_file.available_precisions`` lists the
    folder, for any version.
The plain ``onnx`` flavour is logged beside it in the same run (``mlflow.onnx.load_model``).

Artifacts land in the experiment's S3 store: through an MLflow server started with
``--artifacts-destination s3://`` (clients need no S3 keys), or directly with ``MLFLOW_S3_ENDPOINT_URL`` +
AWS credentials (then the bucket is created when missing and ``registry.create_bucket`` is set).

The promotion gate: every new version gets the ``challenger`` alias; it also becomes ``champion`` if its
val mIoU beats the champion's by more than ``registry.promotion_margin`` (or there is no champion).
Registration is idempotent per training run (versions are found by their ``training_run_id`` tag).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, TEMPORARILY_UNAVAILABLE, ErrorCode
from mlflow.types import Schema, TensorSpec

from components import storage
from components.config import Config
from components.errors import MLFLOW_NOT_FOUND_CODES, RegistryError, StorageError
from components.serving import BUNDLED_MODULES, PRECISIONS, SERVING_REQUIREMENTS, variant_path
from components.tracking.registry_read import ONNX_SUBPATH
from components.tracking.runs import configure, git_commit

logger = logging.getLogger(__name__)
_RETRYABLE_CODES = {ErrorCode.Name(code) for code in (TEMPORARILY_UNAVAILABLE, INTERNAL_ERROR)}

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_NAME = "segmenter"
"""Name of the registered MLflow model inside the training run."""
_ONNX_REQUIREMENTS = ("mlflow-skinny", "onnx", "onnxruntime", "numpy")
"""What ``mlflow.onnx.load_model`` of the plain ONNX flavour needs."""
T = TypeVar("T")


@dataclass
class RegistrationResult:
    name: str
    version: str
    aliases: list[str]
    promoted: bool
    """Whether this version is the champion after this call."""
    created: bool
    """False when the training run was registered before (nothing new was created)."""
    champion_miou: float | None
    """The previous champion's val mIoU (None if there was none)."""

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def register_and_promote(
    cfg: Config,
    train_run_id: str,
    pytorch_model: Callable[[], Any],
    onnx_path: str,
    val_miou: float,
    baseline_miou: float,
    dataset_fingerprint: str,
) -> RegistrationResult:
    """Log the model (pytorch + ONNX-backed pyfunc, plus plain onnx) in the training run, register it as
    ``cfg.registry.model_name`` and decide its aliases. ``pytorch_model`` loads the trained network, called
    only when a version must be logged. Network failures are retried, then RegistryError."""
    name = cfg.registry.model_name
    retry(lambda: configure(cfg), "the MLflow tracking server")
    client = mlflow.MlflowClient()
    _ensure_bucket(cfg, client)
    version = retry(lambda: _find_version(client, name, train_run_id), "the MLflow model registry")
    created = version is None
    if created:
        tags = {
            "val_miou": f"{val_miou:.6f}",
            "baseline_miou": f"{baseline_miou:.6f}",
            "recipe": cfg.recipe,
            "dataset_fingerprint": dataset_fingerprint,
            "training_run_id": train_run_id,
            "git_commit": git_commit(),
            # What predict --precision can ask this version for (its onnx/ folder holds the files).
            "onnx_variants": ",".join(["fp32", *_exported_variants(cfg)]),
        }
        # Look again before every attempt: a lost response may hide a version the server did create.
        version = retry(
            lambda: (
                _find_version(client, name, train_run_id)
                or _log_and_register(cfg, train_run_id, pytorch_model, onnx_path, tags)
            ),
            "the MLflow server / artifact store",
        )
    elif "promotion" in version.tags:
        logger.info(
            "training run %s is already %s version %s; nothing to do", train_run_id, name, version.version
        )
        aliases = retry(lambda: client.get_model_version(name, version.version).aliases, "the registry")
        return RegistrationResult(
            name,
            version.version,
            sorted(aliases),
            CHAMPION in aliases,
            False,
            _float(version.tags, "champion"),
        )
    # A new version, or one whose promotion step was interrupted: decide (again) and set the aliases.
    return retry(
        lambda: _promote(cfg, client, version.version, train_run_id, val_miou, created),
        "the MLflow model registry",
    )


def retry(call: Callable[[], T], what: str, attempts: int = 4, base_delay: float = 1.0) -> T:
    """Run ``call``; on a network failure wait 1 s, 2 s, 4 s… and try again, then raise RegistryError."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as exc:
            if not _is_network_error(exc):
                raise
            if attempt == attempts:
                raise RegistryError(
                    f"{what} is unreachable ({mlflow.get_tracking_uri()}) after {attempts} attempts: "
                    f"{_short(exc)}. Check that the MLflow server and the S3 endpoint are up, then re-run; "
                    "a re-run registers exactly one version."
                ) from None
            delay = base_delay * 2 ** (attempt - 1)
            logger.warning("%s unreachable (%s); retrying in %.0f s", what, _short(exc), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _is_network_error(exc: BaseException) -> bool:
    import requests
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError

    if isinstance(exc, ConnectionError | requests.ConnectionError | requests.Timeout | StorageError):
        return True
    if isinstance(exc, EndpointConnectionError | ConnectionClosedError):
        return True
    if isinstance(exc, MlflowException):
        message = exc.message
        # MLflow wraps HTTP connection failures and 5xx answers (e.g. a proxied S3 upload that failed).
        return "API request to" in message or exc.error_code in _RETRYABLE_CODES
    return False


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc)
    return text if len(text) < 300 else text[:300] + "…"


def _ensure_bucket(cfg: Config, client: mlflow.MlflowClient) -> None:
    """Direct-to-S3 mode: create the experiment's artifact bucket if missing (proxied mode: the server's)."""
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    location = experiment.artifact_location if experiment else ""
    if not (cfg.registry.create_bucket and storage.is_s3(location)):
        return
    bucket, _ = storage.split_s3(location)
    s3 = storage.s3_client()
    existing = {
        b["Name"] for b in retry(s3.list_buckets, f"the S3 endpoint {storage.s3_endpoint_url()}")["Buckets"]
    }
    if bucket not in existing:
        logger.info("creating S3 bucket %s for MLflow artifacts", bucket)
        retry(lambda: s3.create_bucket(Bucket=bucket), f"the S3 endpoint {storage.s3_endpoint_url()}")


def _find_version(client: mlflow.MlflowClient, name: str, train_run_id: str) -> Any:
    versions = client.search_model_versions(f"name = '{name}' and tags.training_run_id = '{train_run_id}'")
    return min(versions, key=lambda v: int(v.version)) if versions else None


def _log_and_register(
    cfg: Config, train_run_id: str, pytorch_model: Callable[[], Any], onnx_path: str, tags: dict[str, str]
) -> Any:
    variant_files = _variant_files(cfg, onnx_path)  # before anything is loaded or logged
    model = pytorch_model()
    active = mlflow.active_run()
    run = nullcontext() if active and active.info.run_id == train_run_id else mlflow.start_run(train_run_id)
    # A retried attempt (MLflow or S3 outage) must not leave a model-sized copy behind in /tmp.
    with tempfile.TemporaryDirectory(prefix="cityseg-registry-") as scratch, run:
        local_onnx = storage.copy_to_local(onnx_path, Path(scratch, "model.onnx"))
        variants = {
            precision: str(storage.copy_to_local(uri, Path(scratch, f"model.{precision}.onnx")))
            for precision, uri in variant_files.items()
        }
        info = mlflow.models.Model.log(
            artifact_path=None,
            name=MODEL_NAME,
            flavor=_SegmenterFlavor,
            pytorch_model=model,
            onnx_file=str(local_onnx),
            onnx_variants=variants,
            signature=mask_signature(),
            input_example=np.zeros((1, 32, 64, 3), dtype=np.uint8),
            pip_requirements=_pinned_requirements(SERVING_REQUIREMENTS),
        )
        import onnx

        mlflow.onnx.log_model(
            onnx.load(str(local_onnx)),
            name="onnx",
            signature=logits_signature(cfg.model.num_classes),
            save_as_external_data=False,
            pip_requirements=_pinned_requirements(_ONNX_REQUIREMENTS),
        )
    version = mlflow.register_model(info.model_uri, cfg.registry.model_name, tags=tags)
    logger.info(
        "registered %s version %s from run %s", cfg.registry.model_name, version.version, train_run_id
    )
    return version


def _exported_variants(cfg: Config) -> list[str]:
    """The precisions beside fp32 that the export stage wrote (and gated) under ``cfg.export``."""
    return [precision for precision in PRECISIONS if precision != "fp32" and getattr(cfg.export, precision)]


def _variant_files(cfg: Config, onnx_path: str) -> dict[str, str]:
    """precision -> the variant file the export stage wrote beside ``onnx_path``; a missing one is a
    RegistryError naming it (not a network error to retry)."""
    files = {precision: variant_path(onnx_path, precision) for precision in _exported_variants(cfg)}
    for precision, uri in files.items():
        if not storage.exists(uri):
            raise RegistryError(
                f"export.{precision} is on but {uri} does not exist: export {onnx_path} with "
                f"export.{precision}=true before registering it (or register with export.{precision}=false)"
            )
    return files


def _promote(
    cfg: Config, client: mlflow.MlflowClient, version: str, train_run_id: str, val_miou: float, created: bool
) -> RegistrationResult:
    name = cfg.registry.model_name
    champion = _alias_version(client, name, CHAMPION)
    champion_miou = _float(champion.tags, "val_miou") if champion and champion.version != version else None
    if champion is not None and champion.version == version:
        promoted, decision = True, "already champion"
    elif champion is None:
        promoted, decision = True, "promoted: no champion yet"
    else:
        margin = cfg.registry.promotion_margin
        # The champion's mIoU comes from its 6-decimal tag: compare like with like, so that a retrained
        # model no better than the champion is not promoted by the digits the tag dropped.
        promoted = round(val_miou, 6) > champion_miou + margin
        verdict = "promoted" if promoted else "kept as challenger"
        comparison = ">" if promoted else "<="
        decision = (
            f"{verdict}: val mIoU {val_miou:.4f} {comparison} champion v{champion.version} "
            f"{champion_miou:.4f} + margin {margin:.4f}"
        )
    client.set_registered_model_alias(name, CHALLENGER, version)
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    logger.info("%s version %s: %s", name, version, decision)
    if champion_miou is not None:
        client.set_model_version_tag(name, version, "champion", f"{champion_miou:.6f}")
    client.update_model_version(name, version, description=decision)
    client.log_metric(train_run_id, "registry.val_miou", val_miou)
    if champion_miou is not None:
        client.log_metric(train_run_id, "registry.champion_val_miou", champion_miou)
    client.set_tag(train_run_id, "registry.version", version)
    client.set_tag(train_run_id, "registry.decision", decision)
    # Written last: its presence marks a completed registration (re-runs are then no-ops).
    client.set_model_version_tag(name, version, "promotion", decision)
    aliases = client.get_model_version(name, version).aliases
    return RegistrationResult(name, version, sorted(aliases), promoted, created, champion_miou)


def _alias_version(client: mlflow.MlflowClient, name: str, alias: str) -> Any:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in MLFLOW_NOT_FOUND_CODES:
            return None
        raise


def _float(tags: dict[str, str], key: str) -> float | None:
    return float(tags[key]) if key in tags else None


def mask_signature() -> ModelSignature:
    """The served model: uint8 RGB images (N x H x W x 3) -> uint8 trainId masks (N x H x W)."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]),
    )


def logits_signature(num_classes: int) -> ModelSignature:
    """The plain ONNX graph: normalised NCHW float32 -> NCHW float32 logits."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1), "image")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes, -1, -1), "logits")]),
    )


def _pinned_requirements(packages: tuple[str, ...]) -> list[str]:
    """``package==<installed version>``: the served model gets what it was tested with."""
    pins = []
    for package in packages:
        # onnxruntime-gpu (the image's) is the same module: the lean server gets the CPU build of its version.
        for installed in (package, f"{package}-gpu") if package == "onnxruntime" else (package,):
            try:
                pins.append(f"{package}=={importlib_metadata.version(installed)}")
                break
            except importlib_metadata.PackageNotFoundError:
                continue
        else:
            pins.append(package)
    return pins


class _SegmenterFlavor:
    """A 'flavor' for ``mlflow.models.Model.log``: the pytorch flavour plus an ONNX-backed mask pyfunc."""

    __name__ = "cityseg_segmenter"

    @staticmethod
    def save_model(
        path: str,
        mlflow_model: Any,
        pytorch_model: Any,
        onnx_file: str,
        onnx_variants: dict[str, str],
        **kwargs: Any,
    ) -> None:
        import components

        # pickle, not pt2: pt2 would trace the network with the *mask* model's uint8 input example. No
        # code_paths: the weights are loaded (components.model) where the project is installed.
        mlflow.pytorch.save_model(
            pytorch_model, path, mlflow_model=mlflow_model, serialization_format="pickle", **kwargs
        )
        target = Path(path, ONNX_SUBPATH)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(onnx_file, target)
        for precision, variant in onnx_variants.items():  # e.g. onnx/model.int8.onnx for predict --precision
            shutil.copyfile(variant, variant_path(str(target), precision))
        # The serving code: the lean modules only, so loading the pyfunc never imports the training stack.
        bundle = Path(path, "code", "components")
        bundle.mkdir(parents=True)
        for module in BUNDLED_MODULES:
            shutil.copyfile(Path(components.__file__).parent / module, bundle / module)
        # Replace the pytorch pyfunc (which returns logits) with the ONNX one that returns masks.
        pytorch_pyfunc = mlflow_model.flavors.pop(mlflow.pyfunc.FLAVOR_NAME)
        mlflow.pyfunc.add_to_model(
            mlflow_model,
            loader_module="components.serving",
            data=ONNX_SUBPATH,
            code="code",
            conda_env=pytorch_pyfunc.get("env", {}).get("conda", "conda.yaml"),
            python_env=pytorch_pyfunc.get("env", {}).get("virtualenv", "python_env.yaml"),
        )
        mlflow_model.save(str(Path(path, "MLmodel")))
