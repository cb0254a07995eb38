"""Every rule a multi-node training job must pass, in one function: ``validate_job``.

    job = validate_job("strong", overrides, run_name="strong-resnet50-train")

It runs before anything is rendered or submitted, by the CLI and by the runner alike, and returns the
``ClusterJob`` the manifests are rendered from. The rules, each raising ``ConfigError`` naming the field:

* **Recipe**: a recipe name, not a YAML file (the pods receive recipe + overrides and cannot read it).
* **Output dir on S3**: nodes share no disk, and the flow reads the result from ``train.output_dir``; a
  local one under ``run_dir`` moves to the same place under ``orchestration.multinode.s3_run_dir``, any
  other local one is refused.
* **Job name**: a DNS label short enough that pod host names ``<name>-<index>`` fit in 63 characters.
* **Image**: ``orchestration.multinode.image`` (or ``--image``) names the image the pods run.
* **Data**: the ``trainjob`` engine mounts no claim; without a claim the data comes from the S3 mirror;
  ``data.root`` lies under the pods' data volume (``CONTAINER_DATA``).
* **Tracking**: the MLflow store is a server the pods reach, not a local file or sqlite.
* **Pod environment**: the endpoints the pods receive (``FORWARDED_VARIABLES``) carry no credentials.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import components.cluster.names as names
from components.config import Config, load_config
from components.errors import ConfigError
from components.storage import is_s3, join

CONTAINER_WORKDIR = "/opt/cityseg"  # the image's WORKDIR: relative config paths start here
CONTAINER_DATA = "/opt/cityseg/data"
"""Where the pods' data volume (the claim, or the S3 mirror) is mounted."""
FORWARDED_VARIABLES = (
    "MLFLOW_TRACKING_URI",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
)
"""Plain settings of the submitting process that the pods receive as ``env`` values (never credentials)."""
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class ClusterJob:
    """A multi-node training job that passed every rule: what its manifests are rendered from."""

    cfg: Config
    """Loaded from ``recipe`` + ``overrides``."""
    recipe: str
    overrides: list[str]
    """With ``recipe``, the pods' config: the caller's overrides, plus the ``s3://`` output dir if moved."""
    name: str
    image: str
    env: dict[str, str]
    """The pods' plain environment: the submitting process's endpoints and a progress-bar interval."""


def validate_job(
    recipe: str,
    overrides: Sequence[str],
    *,
    run_name: str | None = None,
    job_name: str | None = None,
    image: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> ClusterJob:
    """Check recipe + ``overrides`` against every rule (module docstring) and return the job to render.

    The job's name is ``job_name`` as given (the CLI's ``--job-name``), else derived from ``run_name`` and
    the output dir (``names.job_name``: a rerun of the run gets the same job). ``image`` defaults to
    ``orchestration.multinode.image``; ``environ`` (default: this process's) gives the pods' endpoints
    and the MLflow server.
    """
    environ = os.environ if environ is None else environ
    if Path(recipe).suffix in (".yaml", ".yml"):
        raise ConfigError(
            f"recipe {recipe!r} is a file the job's pods cannot read: use a recipe name plus overrides"
        )
    overrides = _with_s3_output_dir(load_config(recipe, list(overrides)), list(overrides))
    cfg = load_config(recipe, overrides)
    settings = cfg.orchestration.multinode
    if job_name is None:
        if run_name is None:
            raise ValueError("validate_job needs a run_name or a job_name")
        job_name = names.job_name(run_name, cfg.train.output_dir, settings.nodes)
    _check_job_name(job_name, settings.nodes)
    image = image or settings.image
    if not image or "{{" in image:
        raise ConfigError(
            f"orchestration.multinode.image={image!r}: name the project image the pods run (--image on the "
            "command line; the Kubernetes deployment takes it from CITYSEG_IMAGE where `prefect deploy` runs)"
        )
    _check_data(cfg)
    _check_tracking(cfg, environ)
    return ClusterJob(cfg, recipe, overrides, job_name, image, _pod_env(environ))


def _with_s3_output_dir(cfg: Config, overrides: list[str]) -> list[str]:
    """``overrides`` with ``train.output_dir`` on ``s3://``: a local one under run_dir moves to the same
    place under ``orchestration.multinode.s3_run_dir`` (the finetune flow's ``<run_dir>/flow-runs/<id>/
    train``: one checkpoint folder per flow run that every node and the flow reach)."""
    output_dir, s3_run_dir = cfg.train.output_dir, cfg.orchestration.multinode.s3_run_dir
    if is_s3(output_dir):
        return overrides
    run_dir = Path(cfg.run_dir).resolve()
    local = Path(output_dir).resolve()
    if s3_run_dir is None or not local.is_relative_to(run_dir):
        raise ConfigError(
            f"train.output_dir={output_dir!r} is local, but the nodes of a multi-node job share no disk (any "
            "node, or a replacement pod, resumes from the checkpoints): set "
            "orchestration.multinode.s3_run_dir=s3://bucket/runs (it stands in for run_dir) or "
            "train.output_dir=s3://bucket/prefix"
        )
    return [*overrides, f"train.output_dir={join(s3_run_dir, local.relative_to(run_dir).as_posix())}"]


def _check_job_name(job_name: str, nodes: int) -> None:
    # Pod hostnames are "<job>-<index>": both must be DNS labels of at most 63 characters.
    if not _DNS_LABEL.match(job_name) or len(f"{job_name}-{nodes - 1}") > 63:
        raise ConfigError(
            f"job name {job_name!r} must be a DNS label (lowercase letters, digits, '-'), short enough that "
            f"'<name>-{nodes - 1}' fits in 63 characters"
        )


def _check_data(cfg: Config) -> None:
    settings = cfg.orchestration.multinode
    if settings.engine == "trainjob" and settings.data_claim is not None:
        raise ConfigError(
            f"orchestration.multinode.data_claim={settings.data_claim!r}: the trainjob engine mounts no "
            "claim (its pods mirror the data from S3): set orchestration.multinode.data_claim=null "
            "data.source=s3 data.uri=s3://bucket/cityscapes, or use engine=indexed-job"
        )
    if settings.data_claim is None and cfg.data.source != "s3":
        raise ConfigError(
            "orchestration.multinode.data_claim is None, so the data must come from the S3 mirror: "
            "set data.source=s3 data.uri=s3://bucket/cityscapes (or name a read-many data claim)"
        )
    root = posixpath.normpath(posixpath.join(CONTAINER_WORKDIR, cfg.data.root))
    if not root.startswith(f"{CONTAINER_DATA}/"):
        raise ConfigError(
            f"data.root={cfg.data.root!r} is {root} in the pods, outside {CONTAINER_DATA} where the data "
            "claim (or the S3 mirror) is: use a data.root under it, e.g. data/cityscapes"
        )


def _check_tracking(cfg: Config, environ: Mapping[str, str]) -> None:
    tracking_uri = cfg.tracking.tracking_uri or environ.get("MLFLOW_TRACKING_URI") or ""
    if urlsplit(tracking_uri).scheme in ("", "file", "sqlite"):
        raise ConfigError(
            f"the MLflow store {tracking_uri or cfg.resolved_tracking_uri()!r} is local to this machine, the "
            "job's pods cannot log to it: set MLFLOW_TRACKING_URI (or tracking.tracking_uri) to a server"
        )


def _pod_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The pods' plain environment: ``environ``'s endpoints (FORWARDED_VARIABLES) and a progress-bar
    interval for piped logs. A URL with credentials in it is refused: those belong in the Secret."""
    env = {name: environ[name] for name in FORWARDED_VARIABLES if environ.get(name)}
    for name, value in env.items():
        if "@" in urlsplit(value).netloc:
            raise ConfigError(
                f"{name} carries credentials in its URL, which a manifest must not: put them in the "
                "credentials Secret (MLFLOW_TRACKING_USERNAME/PASSWORD, AWS_ACCESS_KEY_ID/SECRET_ACCESS_KEY)"
            )
    env["TQDM_MININTERVAL"] = environ.get("TQDM_MININTERVAL", "30")
    return env
