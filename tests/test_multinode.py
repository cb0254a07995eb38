"""Multi-node manifests: rendered from the config, valid for every supported Kubernetes version (offline
schemas from kubernetes-validate), wired for c10d rendezvous, and free of secret values."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any
from unittest import mock

import kubernetes_validate
import pytest
import yaml

from components.config import load_config
from components.errors import ConfigError
from components.k8sjob import render_job, run_labels
from components.multinode import MIRROR_SCRIPT, SUPPORTED_KUBERNETES, rbac_manifests, training_manifests
from components.storage import join
from flows.stages import multinode_overrides

ROOT = Path(__file__).resolve().parents[1]
S3_OUT = "train.output_dir=s3://cityseg/runs/finetune-abc"
IMAGE = "registry.example/cityseg-ops:1a2b3c"


def _render(overrides: list[str], recipe: str = "strong", job_name: str = "finetune-abc"):
    cfg = load_config(recipe, overrides)
    return training_manifests(
        cfg,
        image="registry.example/cityseg-ops:1a2b3c",
        job_name=job_name,
        recipe=recipe,
        overrides=overrides,
    )


def _k8s_finetune_deployment() -> dict[str, Any]:
    """The finetune/cityscapes-k8s deployment as `prefect deploy` stores it: ``{{ $CITYSEG_IMAGE }}``
    resolved from the environment (deploy/deploy.sh requires CITYSEG_IMAGE)."""
    from prefect.utilities.templating import apply_values

    deployments = yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())["deployments"]
    finetune = next(d for d in deployments if d["name"] == "cityscapes-k8s" and "finetune" in d["entrypoint"])
    with mock.patch.dict(os.environ, {"CITYSEG_IMAGE": IMAGE}):
        return apply_values(finetune, os.environ, remove_notset=False)


def _k8s_deployment_overrides() -> list[str]:
    return list(_k8s_finetune_deployment()["parameters"].get("overrides", []))


@pytest.mark.parametrize("version", SUPPORTED_KUBERNETES)
def test_indexed_job_validates_against_the_kubernetes_schemas(version):
    overrides = [*_k8s_deployment_overrides(), S3_OUT, "orchestration.multinode.nodes=4"]
    manifests = _render(overrides)
    assert [m["kind"] for m in manifests] == ["Service", "Job"]
    for manifest in manifests:
        kubernetes_validate.validate(manifest, version, strict=True)


@pytest.mark.parametrize("version", SUPPORTED_KUBERNETES)
def test_the_kubernetes_deployment_renders_its_training_job_from_the_config(version):
    """What finetune/cityscapes-k8s submits: its parameters and pod environment, the overrides the finetune
    flow adds (its own train.output_dir, the prepared data root, the parent MLflow run), then the train
    stage's (flows/stages.py) and render_job, as run_training_job calls it."""
    deployment = _k8s_finetune_deployment()
    recipe, overrides = deployment["parameters"]["recipe"], _k8s_deployment_overrides()
    flow_run_id = str(uuid.uuid4())
    cfg = load_config(recipe, overrides)
    overrides += [
        f"train.output_dir={join(cfg.run_dir, 'flow-runs', flow_run_id, 'train')}",
        "data.root=/opt/cityseg/data/cityscapes",  # what the prepare stage returns in its pod
        "tracking.parent_run_id=0123456789abcdef",
    ]
    cfg = load_config(recipe, overrides)
    assert cfg.orchestration.multinode.enabled
    overrides = multinode_overrides(cfg, overrides)
    cfg = load_config(recipe, overrides)
    assert cfg.train.output_dir == f"s3://cityseg/runs/flow-runs/{flow_run_id}/train"  # one per flow run
    run_name = "strong-resnet50-train"
    name, manifests = render_job(
        cfg,
        recipe=recipe,
        overrides=overrides,
        run_name=run_name,
        labels=run_labels(str(uuid.uuid4()), run_name, flow_run_id),
        environ=deployment["work_pool"]["job_variables"]["env"],
    )
    assert [m["kind"] for m in manifests] == ["Service", "Job"]
    for manifest in manifests:
        kubernetes_validate.validate(manifest, version, strict=True)
    job = manifests[1]
    assert job["metadata"]["name"] == name and name.startswith(run_name)
    assert job["metadata"]["labels"]["cityseg-ops/root-flow-run-id"] == flow_run_id
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == IMAGE
    assert pod["automountServiceAccountToken"] is False
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["AWS_ENDPOINT_URL_S3"] == "http://seaweedfs:8333"
    assert job["spec"]["ttlSecondsAfterFinished"] > 0  # jobs clean up after themselves


@pytest.mark.parametrize("engine", ["indexed-job", "trainjob"])
@pytest.mark.parametrize("version", SUPPORTED_KUBERNETES)
def test_the_launcher_role_validates_against_the_kubernetes_schemas(engine, version):
    role, binding = rbac_manifests(load_config("strong", [f"orchestration.multinode.engine={engine}"]))
    for manifest in (role, binding):
        kubernetes_validate.validate(manifest, version, strict=True)
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "cityseg-runner", "namespace": "cityseg"}
    ]
    assert all("*" not in rule["verbs"] + rule["resources"] for rule in role["rules"])


def test_agents_meet_at_pod_zero_through_the_headless_service():
    service, job = _render([S3_OUT, "orchestration.multinode.nodes=4", "orchestration.multinode.min_nodes=2"])
    pod = job["spec"]["template"]
    assert service["spec"]["clusterIP"] == "None"
    assert pod["spec"]["subdomain"] == service["metadata"]["name"] == "finetune-abc"
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 4
    command = pod["spec"]["containers"][0]["command"]
    assert command[:7] == [
        "torchrun",
        "--nnodes=2:4",
        "--nproc-per-node=8",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=finetune-abc-0.finetune-abc:29400",
        "--rdzv-id=finetune-abc",
        "--max-restarts=3",
    ]
    assert command[7:] == [
        "-m",
        "components.train",
        "--recipe",
        "strong",
        S3_OUT,
        "orchestration.multinode.nodes=4",
        "orchestration.multinode.min_nodes=2",
    ]
    limits = pod["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "8"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_trainjob_engine_renders_a_kubeflow_trainjob_whose_pods_mirror_the_data_first():
    s3_data = [S3_OUT, "orchestration.multinode.data_claim=null", "data.source=s3", "data.uri=s3://d/cs"]
    overrides = [*s3_data, "orchestration.multinode.engine=trainjob", "orchestration.multinode.nodes=3"]
    (train_job,) = _render(overrides)
    assert train_job["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert train_job["kind"] == "TrainJob"
    assert train_job["spec"]["runtimeRef"] == {"name": "torch-distributed"}
    assert train_job["spec"]["trainer"]["numNodes"] == 3
    shell, flag, script = train_job["spec"]["trainer"]["command"]
    assert (shell, flag) == ("sh", "-c")
    # The mirror the Indexed Job's init container runs (for real in the test below), then torchrun, whose
    # PET_* variables the runtime sets: no rendezvous flags of its own.
    mirror = ["python", "-c", MIRROR_SCRIPT, "--recipe", "strong", *overrides]
    (init,) = _render(s3_data)[1]["spec"]["template"]["spec"]["initContainers"]
    assert init["command"] == mirror[: -len(overrides)] + s3_data
    train = ["torchrun", "-m", "components.train", "--recipe", "strong", *overrides]
    assert shlex.split(script) == [*mirror, "&&", "exec", *train]


def test_manifests_name_the_secret_but_never_carry_its_values(monkeypatch):
    sentinel = "sentinel-secret-7f3a9c"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", sentinel)
    monkeypatch.setenv("CITYSCAPES_PASSWORD", sentinel)
    text = yaml.safe_dump_all(_render([S3_OUT]))
    assert sentinel not in text
    assert "secretKeyRef" in text and "cityseg-credentials" in text


@pytest.mark.parametrize(
    ("overrides", "job_name", "named"),
    [
        (["train.output_dir=/local/runs"], "finetune-abc", "train.output_dir"),
        ([S3_OUT, "orchestration.multinode.data_claim=null"], "finetune-abc", "data.source=s3"),
        ([S3_OUT, "orchestration.multinode.engine=trainjob"], "finetune-abc", "data_claim='cityseg-data'"),
        ([S3_OUT, "data.root=/mnt/cityscapes"], "finetune-abc", "data.root"),
        ([S3_OUT], "Finetune_ABC", "DNS label"),
        ([S3_OUT], "f" * 62, "63 characters"),
    ],
)
def test_unsafe_jobs_are_refused_with_the_field_named(overrides, job_name, named):
    with pytest.raises(ConfigError, match=named):
        _render(overrides, job_name=job_name)


@pytest.mark.slow
def test_without_a_data_claim_each_pod_mirrors_the_dataset_from_s3_first(
    s3_endpoint, synthetic_root, tmp_path
):
    """The init container's command, run here in a folder standing in for the image's /opt/cityseg, against
    a real S3 endpoint (moto): the pod's data.root ends up holding the prepared dataset."""
    from components import storage
    from components.data.prepare import dataset_fingerprint

    storage.s3_client().create_bucket(Bucket="datasets")
    for path in sorted(synthetic_root.rglob("*")):
        if path.is_file() and path.relative_to(synthetic_root).parts[0] in ("leftImg8bit", "gtFine"):
            key = f"cityscapes/{path.relative_to(synthetic_root).as_posix()}"
            storage.s3_client().upload_file(str(path), "datasets", key)
    overrides = [
        S3_OUT,
        "orchestration.multinode.data_claim=null",
        "data.source=s3",
        "data.uri=s3://datasets/cityscapes",
        "data.trainid_workers=1",
    ]
    _service, job = _render(overrides)
    pod = job["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    trainer = pod["containers"][0]
    data_volume = next(v for v in pod["volumes"] if v["name"] == "data")
    assert data_volume == {"name": "data", "emptyDir": {}}
    for container in (init, trainer):
        assert {"name": "data", "mountPath": "/opt/cityseg/data", "readOnly": False} in container[
            "volumeMounts"
        ]
    assert "nvidia.com/gpu" not in init["resources"]["limits"]
    for version in SUPPORTED_KUBERNETES:
        kubernetes_validate.validate(job, version, strict=True)

    command = [sys.executable, *init["command"][1:]]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=True)
    assert dataset_fingerprint(tmp_path / "data" / "cityscapes") == dataset_fingerprint(synthetic_root)


def test_node_range_is_checked_by_the_config():
    with pytest.raises(ConfigError, match="min_nodes"):
        load_config("strong", ["orchestration.multinode.nodes=2", "orchestration.multinode.min_nodes=3"])


def test_cli_prints_applicable_yaml(tmp_path):
    done = _cli("--image", "img:1", "--job-name", "ft-1", S3_OUT)
    assert done.returncode == 0, done.stderr
    assert [m["kind"] for m in yaml.safe_load_all(done.stdout)] == ["Service", "Job"]
    refused = _cli("--image", "img:1", "--job-name", "ft-1")
    assert (
        refused.returncode == 1 and "train.output_dir" in refused.stderr and "Traceback" not in refused.stderr
    )
    rbac = _cli("--rbac")
    assert rbac.returncode == 0, rbac.stderr
    assert [m["kind"] for m in yaml.safe_load_all(rbac.stdout)] == ["Role", "RoleBinding"]
    assert "&id" not in done.stdout + rbac.stdout  # no YAML aliases for shared objects


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "components.multinode", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
