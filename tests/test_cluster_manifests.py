"""Multi-node manifests (components/cluster/manifests.py and the CLI): rendered from a validated job, valid
for every supported Kubernetes version (offline schemas from kubernetes-validate), wired for c10d
rendezvous, free of secret values; the pods' S3 mirror runs the data stage's entry point for real."""

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

from components.cluster.__main__ import main as cluster_cli
from components.cluster.manifests import (
    SUPPORTED_KUBERNETES,
    mirror_command,
    rbac_manifests,
    training_manifests,
)
from components.cluster.names import run_labels
from components.cluster.rules import validate_job
from components.config import load_config
from components.storage import join

ROOT = Path(__file__).resolve().parents[1]
S3_OUT = "train.output_dir=s3://cityseg/runs/finetune-abc"
IMAGE = "registry.example/cityseg-ops:1a2b3c"
TRACKING = {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}


def _render(overrides: list[str], recipe: str = "strong", job_name: str = "finetune-abc"):
    job = validate_job(recipe, overrides, job_name=job_name, image=IMAGE, environ=TRACKING)
    return training_manifests(job)


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
    flow adds (its own train.output_dir, the prepared data root, the parent MLflow run), validated and
    rendered as train_on_cluster does (which moves the local output dir to s3_run_dir)."""
    deployment = _k8s_finetune_deployment()
    recipe, overrides = deployment["parameters"]["recipe"], _k8s_deployment_overrides()
    flow_run_id = str(uuid.uuid4())
    cfg = load_config(recipe, overrides)
    overrides += [
        f"train.output_dir={join(cfg.run_dir, 'flow-runs', flow_run_id, 'train')}",
        "data.root=/opt/cityseg/data/cityscapes",  # what the prepare stage returns in its pod
        "tracking.parent_run_id=0123456789abcdef",
    ]
    assert load_config(recipe, overrides).orchestration.multinode.enabled
    run_name = "strong-resnet50-train"
    job = validate_job(
        recipe, overrides, run_name=run_name, environ=deployment["work_pool"]["job_variables"]["env"]
    )
    # One checkpoint folder per flow run, that every node reaches.
    assert job.cfg.train.output_dir == f"s3://cityseg/runs/flow-runs/{flow_run_id}/train"
    name = job.name
    manifests = training_manifests(job, run_labels(str(uuid.uuid4()), run_name, flow_run_id))
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
    mirror = ["python", "-m", "components.data", "prepare", "--recipe", "strong", *overrides]
    assert mirror == mirror_command("strong", overrides)
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


@pytest.mark.slow
def test_without_a_data_claim_each_pod_mirrors_the_dataset_from_s3_first(
    s3_endpoint, synthetic_root, tmp_path
):
    """The init container's command (the data stage's own entry point, ``python -m components.data
    prepare``), run here in a folder standing in for the image's /opt/cityseg, against a real S3 endpoint
    (moto): the pod's data.root ends up holding the prepared dataset."""
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

    assert init["command"][:4] == ["python", "-m", "components.data", "prepare"]
    command = [sys.executable, *init["command"][1:]]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=True)
    assert dataset_fingerprint(tmp_path / "data" / "cityscapes") == dataset_fingerprint(synthetic_root)


def test_cli_prints_applicable_yaml(monkeypatch, capsys):
    """``python -m components.cluster``: the job (checked by the same rules as the train stage's, with this
    shell's endpoints) or the Role, as YAML that ``kubectl apply -f -`` takes; a refused job is one line."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert cluster_cli(["--image", "img:1", "--job-name", "ft-1", S3_OUT]) == 0
    job_yaml = capsys.readouterr().out
    (_service, job) = yaml.safe_load_all(job_yaml)
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"} in env
    assert cluster_cli(["--image", "img:1", "--job-name", "ft-1"]) == 1
    refused = capsys.readouterr().err
    assert refused.startswith("error: train.output_dir=") and "Traceback" not in refused
    # The module's own entry point, in a process of its own.
    rbac = subprocess.run(
        [sys.executable, "-m", "components.cluster", "--rbac"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rbac.returncode == 0, rbac.stderr
    assert [m["kind"] for m in yaml.safe_load_all(rbac.stdout)] == ["Role", "RoleBinding"]
    assert "&id" not in job_yaml + rbac.stdout  # no YAML aliases for shared objects
