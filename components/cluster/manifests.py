"""The Kubernetes manifests of one multi-node training job, rendered from a validated ``ClusterJob``
(``components/cluster/rules.py``), and the launcher Role.

``orchestration.multinode.engine`` picks the engine, each an existing one:

* ``indexed-job`` (default, no operator): a headless Service plus a ``batch/v1`` Indexed Job. Pod ``i`` is
  ``<job>-i.<job>`` in the Service's DNS, so every agent meets pod 0's c10d rendezvous store; one torchrun
  agent per pod starts one rank per GPU, with ``--nnodes MIN:MAX`` and ``--max-restarts``.
* ``trainjob``: a Kubeflow Trainer ``TrainJob`` on the ``torch-distributed`` runtime, which sets torchrun's
  ``PET_*`` variables itself; its pods mirror the dataset from S3 (``data_claim`` must be null).

Without a data claim, each pod first runs ``python -m components.data prepare`` (``mirror_command``), the
data stage's own entry point: it mirrors ``data.uri`` into the pod's ``data.root``. Manifests name the
credentials Secret, never its values; plain settings (the MLflow and S3 endpoints) come as ``env`` values.
"""

from __future__ import annotations

import shlex
from typing import Any

import yaml

from components.cluster.names import APP_LABELS, LAUNCHER_ROLE, job_labels
from components.cluster.rules import CONTAINER_DATA, CONTAINER_WORKDIR, ClusterJob
from components.config import Config, MultiNodeConfig

CONTAINER_RUNS = "/opt/cityseg/runs"
IMAGE_UID = 10001  # the image's non-root user (Dockerfile)
TRAINJOB_GROUP, TRAINJOB_VERSION, TRAINJOB_PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
TRAINJOB_API = f"{TRAINJOB_GROUP}/{TRAINJOB_VERSION}"
SUPPORTED_KUBERNETES = ("1.31", "1.32", "1.33", "1.34", "1.35", "1.36", "1.37")
"""Cluster versions whose API schemas the rendered Service and Job are validated against (CI, offline)."""
AGENT_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
"""torchrun agents' environment. torch 2.14's agents share one TCP store with their ranks by default, and
that store breaks re-rendezvous: when a replacement node joins, the surviving rank-0 agent does not
publish the new round's MASTER_ADDR, and both agents wait until they time out (tests/test_elastic.py)."""
CREDENTIAL_KEYS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
)
"""Secret keys passed to the pods as environment variables when present (``optional``)."""


def training_manifests(job: ClusterJob, labels: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The Kubernetes objects of ``job``: its pods receive the job's recipe + overrides again (only the
    config's source travels) and its plain ``env``; credentials come from the Secret only. ``labels`` are
    added to the app's and the job's own (values made valid)."""
    settings = job.cfg.orchestration.multinode
    all_labels = job_labels(job.name, labels)
    train_args = ["-m", "components.train", "--recipe", job.recipe, *job.overrides]
    plain_env = [{"name": name, "value": value} for name, value in {**AGENT_ENV, **job.env}.items()]
    mirror = mirror_command(job.recipe, job.overrides)
    if settings.engine == "trainjob":
        # The TrainJob API offers no init container or volume that holds across Trainer releases (its pod
        # overrides were renamed and reshaped): the trainer container mirrors the data, then runs torchrun.
        mirror_then_train = f"{shlex.join(mirror)} && exec {shlex.join(['torchrun', *train_args])}"
        command = ["sh", "-c", mirror_then_train]
        return [_train_job(settings, job.image, job.name, all_labels, command, plain_env)]
    endpoint = f"{job.name}-0.{job.name}:{settings.rdzv_port}"
    command = ["torchrun", *torchrun_flags(settings, endpoint, rdzv_id=job.name), *train_args]
    indexed_job = _indexed_job(settings, job.image, job.name, all_labels, command, plain_env)
    if settings.data_claim is None:  # each pod mirrors the dataset from S3 before training starts
        init = _container(settings, job.image, mirror, plain_env, gpus=False)
        del init["ports"]
        indexed_job["spec"]["template"]["spec"]["initContainers"] = [{**init, "name": "data"}]
    return [_headless_service(settings, job.name, all_labels), indexed_job]


def mirror_command(recipe: str, overrides: list[str]) -> list[str]:
    """What each pod of a job without a data claim runs first (the Indexed Job's init container, the
    TrainJob's trainer before torchrun): the data stage's entry point, which mirrors data.uri into the
    pod's data.root, writes the trainId labels and validates them."""
    return ["python", "-m", "components.data", "prepare", "--recipe", recipe, *overrides]


def torchrun_flags(settings: MultiNodeConfig, endpoint: str, rdzv_id: str) -> list[str]:
    """One node's torchrun agent: elastic between min_nodes and nodes, c10d rendezvous at ``endpoint``
    (pod 0 in a cluster; 127.0.0.1 in tests/test_elastic.py, which runs these flags)."""
    nnodes = f"{settings.min_nodes or settings.nodes}:{settings.nodes}"
    return [
        f"--nnodes={nnodes}",
        f"--nproc-per-node={settings.gpus_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={rdzv_id}",
        f"--max-restarts={settings.max_restarts}",
    ]


def _headless_service(settings: MultiNodeConfig, job_name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": job_name, "namespace": settings.namespace, "labels": labels},
        "spec": {
            "clusterIP": "None",
            # Agents must resolve pod 0 before it is Ready: the rendezvous happens before any probe passes.
            "publishNotReadyAddresses": True,
            "selector": {"cityseg-ops/job": job_name},
            "ports": [{"name": "rendezvous", "port": settings.rdzv_port, "targetPort": settings.rdzv_port}],
        },
    }


def _indexed_job(
    settings: MultiNodeConfig,
    image: str,
    job_name: str,
    labels: dict[str, str],
    command: list[str],
    plain_env: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job_name, "namespace": settings.namespace, "labels": labels},
        "spec": {
            "completionMode": "Indexed",
            "completions": settings.nodes,
            "parallelism": settings.nodes,
            # torchrun's elastic agents restart the ranks; a lost pod is replaced by the Job controller,
            # and its new agent rejoins the rendezvous, up to max_restarts times.
            "backoffLimit": settings.max_restarts * settings.nodes,
            "activeDeadlineSeconds": settings.active_deadline_seconds,
            "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "subdomain": job_name,
                    "restartPolicy": "Never",
                    "serviceAccountName": settings.service_account,
                    # Training never calls the Kubernetes API: no token in the pods (the account may hold
                    # the launcher Role for the flow's own pod).
                    "automountServiceAccountToken": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": IMAGE_UID,
                        "runAsGroup": IMAGE_UID,
                        "fsGroup": IMAGE_UID,
                    },
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "containers": [_container(settings, image, command, plain_env)],
                    "volumes": _volumes(settings),
                },
            },
        },
    }


def _container(
    settings: MultiNodeConfig,
    image: str,
    command: list[str],
    plain_env: list[dict[str, Any]],
    gpus: bool = True,
) -> dict[str, Any]:
    resources = {"cpu": settings.cpu, "memory": settings.memory}
    if gpus:
        resources["nvidia.com/gpu"] = str(settings.gpus_per_node)
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "runs", "mountPath": CONTAINER_RUNS}]
    # A shared claim is read-only; the pod's own mirror is writable (the decode cache lives beside it).
    mounts.append({"name": "data", "mountPath": CONTAINER_DATA, "readOnly": bool(settings.data_claim)})
    return {
        "name": "trainer",
        "image": image,
        "command": command,
        "workingDir": CONTAINER_WORKDIR,
        "env": [*plain_env, *_env(settings)],
        "ports": [{"name": "rendezvous", "containerPort": settings.rdzv_port}],
        "resources": {"requests": resources, "limits": resources},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": mounts,
    }


def _env(settings: MultiNodeConfig) -> list[dict[str, Any]]:
    return [
        {
            "name": key,
            "valueFrom": {
                "secretKeyRef": {"name": settings.credentials_secret, "key": key, "optional": True}
            },
        }
        for key in CREDENTIAL_KEYS
    ]


def _volumes(settings: MultiNodeConfig) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}},
        # run_dir (relative "runs") is pod-local scratch: checkpoints go to s3://, results to MLflow.
        {"name": "runs", "emptyDir": {}},
    ]
    if settings.data_claim:
        volumes.append(
            {"name": "data", "persistentVolumeClaim": {"claimName": settings.data_claim, "readOnly": True}}
        )
    else:
        volumes.append({"name": "data", "emptyDir": {}})
    return volumes


def _train_job(
    settings: MultiNodeConfig,
    image: str,
    job_name: str,
    labels: dict[str, str],
    command: list[str],
    plain_env: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "apiVersion": TRAINJOB_API,
        "kind": "TrainJob",
        "metadata": {"name": job_name, "namespace": settings.namespace, "labels": labels},
        "spec": {
            "runtimeRef": {"name": "torch-distributed"},
            "trainer": {
                "image": image,
                "command": command,
                "numNodes": settings.nodes,
                "resourcesPerNode": {"limits": {"nvidia.com/gpu": str(settings.gpus_per_node)}},
                "env": [*plain_env, *_env(settings)],
            },
        },
    }


def rbac_manifests(cfg: Config) -> list[dict[str, Any]]:
    """Role + RoleBinding for the flow's pod (``service_account``, the work pool's default too): exactly
    the calls ``components/cluster/api.py`` makes in ``namespace``. The training pods mount no token."""
    settings = cfg.orchestration.multinode
    labels = {**APP_LABELS, "app.kubernetes.io/component": "training-launcher"}
    crud = ["create", "get", "delete"]
    if settings.engine == "trainjob":
        job_rules = [{"apiGroups": [TRAINJOB_GROUP], "resources": [TRAINJOB_PLURAL], "verbs": crud}]
    else:
        job_rules = [
            {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": crud},
            {"apiGroups": [""], "resources": ["services"], "verbs": crud},
        ]
    pod_rules = [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
        {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    ]
    metadata = {"name": LAUNCHER_ROLE, "namespace": settings.namespace, "labels": labels}
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": metadata,
            "rules": [*job_rules, *pod_rules],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": metadata,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": LAUNCHER_ROLE},
            "subjects": [
                {"kind": "ServiceAccount", "name": settings.service_account, "namespace": settings.namespace}
            ],
        },
    ]


class _PlainDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True  # objects shared between manifests (labels, resources) are written out, not as &id001


def to_yaml(manifests: list[dict[str, Any]]) -> str:
    return yaml.dump_all(manifests, Dumper=_PlainDumper, sort_keys=False)
