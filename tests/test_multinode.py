"""Multi-node manifests: rendered from the config, valid for every supported Kubernetes version (offline
schemas from kubernetes-validate), wired for c10d rendezvous, and free of secret values."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from components.config import load_config
from components.errors import ConfigError
from components.multinode import SUPPORTED_KUBERNETES, training_manifests

ROOT = Path(__file__).resolve().parents[1]
S3_OUT = "train.output_dir=s3://cityseg/runs/finetune-abc"


def _render(overrides: list[str], recipe: str = "strong", job_name: str = "finetune-abc"):
    cfg = load_config(recipe, overrides)
    return training_manifests(
        cfg,
        image="registry.example/cityseg-ops:1a2b3c",
        job_name=job_name,
        recipe=recipe,
        overrides=overrides,
    )


def _k8s_deployment_overrides() -> list[str]:
    deployments = yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())["deployments"]
    finetune = next(d for d in deployments if d["name"] == "cityscapes-k8s" and "finetune" in d["entrypoint"])
    return list(finetune["parameters"].get("overrides", []))


@pytest.mark.parametrize("version", SUPPORTED_KUBERNETES)
def test_indexed_job_validates_against_the_kubernetes_schemas(version):
    overrides = [*_k8s_deployment_overrides(), S3_OUT, "orchestration.multinode.nodes=4"]
    manifests = _render(overrides)
    assert [m["kind"] for m in manifests] == ["Service", "Job"]
    for manifest in manifests:
        kubernetes_validate.validate(manifest, version, strict=True)


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


def test_trainjob_engine_renders_a_kubeflow_trainjob():
    (train_job,) = _render(
        [S3_OUT, "orchestration.multinode.engine=trainjob", "orchestration.multinode.nodes=3"]
    )
    assert train_job["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert train_job["kind"] == "TrainJob"
    assert train_job["spec"]["runtimeRef"] == {"name": "torch-distributed"}
    assert train_job["spec"]["trainer"]["numNodes"] == 3
    # The runtime sets torchrun's PET_* variables: the command carries no rendezvous flags of its own.
    assert train_job["spec"]["trainer"]["command"][:3] == ["torchrun", "-m", "components.train"]


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
        ([S3_OUT], "Finetune_ABC", "DNS label"),
        ([S3_OUT], "f" * 62, "63 characters"),
    ],
)
def test_unsafe_jobs_are_refused_with_the_field_named(overrides, job_name, named):
    with pytest.raises(ConfigError, match=named):
        _render(overrides, job_name=job_name)


def test_node_range_is_checked_by_the_config():
    with pytest.raises(ConfigError, match="min_nodes"):
        load_config("strong", ["orchestration.multinode.nodes=2", "orchestration.multinode.min_nodes=3"])


def test_cli_prints_applicable_yaml(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "components.multinode", "--image", "img:1", "--job-name", "ft-1", S3_OUT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert [m["kind"] for m in yaml.safe_load_all(done.stdout)] == ["Service", "Job"]
    refused = subprocess.run(
        [sys.executable, "-m", "components.multinode", "--image", "img:1", "--job-name", "ft-1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        refused.returncode == 1 and "train.output_dir" in refused.stderr and "Traceback" not in refused.stderr
    )
