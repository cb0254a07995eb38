"""Static checks of the container image, the local stack and the deployments (no Docker engine needed)."""

from __future__ import annotations

import ast
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "infra" / "docker-compose.yml"
ENV_EXAMPLE = ROOT / "infra" / ".env.example"
PREFECT_YAML = ROOT / "deploy" / "prefect.yaml"
K8S_TEMPLATE = ROOT / "deploy" / "kubernetes-job-template.json"
HADOLINT = Path(sys.executable).parent / "hadolint"
# Set by torchrun for its workers or by our own code for a child process, not configuration.
PROCESS_INTERNAL_VARIABLES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "PYTHONPATH"}


def _final_stage(dockerfile: str) -> list[str]:
    lines = [line.strip() for line in dockerfile.splitlines() if line.strip() and not line.startswith("#")]
    last_from = max(i for i, line in enumerate(lines) if line.upper().startswith("FROM "))
    return lines[last_from:]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "infra/mlflow/Dockerfile"])
def test_hadolint_is_clean(dockerfile: str) -> None:
    result = subprocess.run([str(HADOLINT), dockerfile], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_is_multi_stage_pinned_and_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:13\.0\.\d+-cudnn-runtime-ubuntu24\.04$", text, re.M)
    assert len(re.findall(r"^FROM ", text, re.M)) >= 3  # uv, builder, final
    final = _final_stage(text)
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users, "the final stage must switch to a non-root USER"
    assert users[-1].split(":")[0] not in ("root", "0")
    final_text = "\n".join(final)
    assert "uv" not in final_text.replace("PYTHONUNBUFFERED", ""), "no build tool in the final stage"
    assert "GIT_COMMIT=${GIT_COMMIT}" in final_text and "ARG GIT_COMMIT" in final_text
    assert "ARG BAKE_WEIGHTS=false" in text and "TORCH_HOME=/opt/torch" in final_text
    assert "requirements.lock" in text and "3.11" in text
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "runs", "data", "tests", "infra/.env"} <= ignored


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_services_healthchecks_and_volumes() -> None:
    compose = _compose()
    services = compose["services"]
    expected = {"postgres", "minio", "minio-init", "mlflow", "prefect-server", "prefect-worker-gpu"}
    assert expected <= set(services)
    for name, service in services.items():
        if name != "minio-init":  # a one-shot job
            assert "healthcheck" in service, f"{name} has no healthcheck"
    assert {"postgres-data", "minio-data", "cityseg-runs", "cityseg-data"} <= set(compose["volumes"])
    assert services["postgres"]["volumes"][0].startswith("postgres-data:")
    mlflow_env = services["mlflow"]["environment"]
    assert mlflow_env["MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD"] == "true"
    assert mlflow_env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert (
        "postgresql+asyncpg://"
        in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    )
    gpu_worker = " ".join(services["prefect-worker-gpu"]["command"])
    assert "--pool gpu-docker --type docker" in gpu_worker
    init_script = services["minio-init"]["command"][0]
    assert "mc mb" in init_script and "mc anonymous set none" in init_script  # private bucket


def test_compose_binds_localhost_and_ships_no_passwords() -> None:
    services = _compose()["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|ACCESS_KEY|_USER$", key):
                assert re.fullmatch(r"\$\{\w+:\?set it in \.env\}", str(value)), f"{name}.{key}={value!r}"
            if "://" in str(value) and "@" in str(value):  # credentials inside a URL
                assert re.search(r"\$\{\w+:\?[^}]*\}:\$\{\w+:\?[^}]*\}@", str(value)), f"{name}.{key}"


def _env_example_names() -> set[str]:
    names = set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.match(r"^#?\s*([A-Z][A-Z0-9_]+)=", line)
        if match:
            names.add(match.group(1))
    return names


def test_env_example_lists_every_compose_variable_with_placeholders() -> None:
    used = set(re.findall(r"\$\{(\w+)", COMPOSE.read_text()))
    assert used <= _env_example_names(), used - _env_example_names()
    for line in ENV_EXAMPLE.read_text().splitlines():
        if re.match(r"^\w*(PASSWORD|SECRET)\w*=", line):
            assert line.endswith("=change-me"), line


def _environment_variables_read_by_code() -> set[str]:
    """Upper-snake string literals in every module under components/ and flows/ that reads os.environ."""
    names = set()
    for path in [*ROOT.glob("components/**/*.py"), *ROOT.glob("flows/**/*.py")]:
        source = path.read_text()
        if "os.environ" not in source and "getenv" not in source:
            continue
        for node in ast.walk(ast.parse(source)):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and re.fullmatch(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)+", node.value)
            ):
                names.add(node.value)
    return names - PROCESS_INTERNAL_VARIABLES


def test_env_example_lists_every_variable_the_code_reads() -> None:
    read = _environment_variables_read_by_code()
    assert {"MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL_S3", "CITYSCAPES_PASSWORD", "GIT_COMMIT"} <= read
    missing = read - _env_example_names()
    assert not missing, f"add these to infra/.env.example: {sorted(missing)}"


def _deployments() -> list[dict[str, Any]]:
    return yaml.safe_load(PREFECT_YAML.read_text())["deployments"]


def _flow_at(entrypoint: str) -> Any:
    from prefect import Flow

    path, _, function = entrypoint.partition(":")
    assert (ROOT / path).is_file(), entrypoint
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    flow = getattr(module, function)
    assert isinstance(flow, Flow), f"{entrypoint} is not a Prefect flow"
    return flow


def test_deployments_resolve_to_flows_and_valid_configs() -> None:
    from components.config import load_config

    deployments = _deployments()
    full_names = {f"{_flow_at(d['entrypoint']).name}/{d['name']}" for d in deployments}
    assert {"finetune/cityscapes", "finetune/cityscapes-k8s", "finetune/cityscapes-local"} <= full_names
    assert {
        "prepare-data/cityscapes",
        "prepare-data/cityscapes-k8s",
        "prepare-data/cityscapes-local",
    } <= full_names
    assert {"predict/cityscapes", "predict/cityscapes-k8s", "predict/cityscapes-local"} <= full_names
    for deployment in deployments:
        parameters = deployment["parameters"]
        if "recipe" in parameters:  # the pipeline's flows (predict takes a model URI instead)
            cfg = load_config(parameters["recipe"], parameters.get("overrides", []))
            for stage_deployment in cfg.orchestration.stage_deployments.values():
                assert stage_deployment in full_names, (
                    f"{deployment['name']} calls unknown {stage_deployment}"
                )
        pool = deployment["work_pool"]["name"]
        assert pool in {"gpu-docker", "cpu-docker", "gpu-k8s", "cpu-k8s", "local"}
        if pool != "local":
            assert (
                deployment["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"]
                == "/opt/cityseg"
            )
        else:
            assert "pull" not in deployment  # the checkout prefect deploy ran in


def test_docker_gpu_deployment_requests_gpus_and_shared_memory() -> None:
    (gpu,) = [
        d for d in _deployments() if d["work_pool"]["name"] == "gpu-docker" and "finetune" in d["entrypoint"]
    ]
    job = gpu["work_pool"]["job_variables"]
    assert job["image"] == "{{ $CITYSEG_IMAGE }}"
    kwargs = job["container_create_kwargs"]
    assert kwargs["device_requests"] == [{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}]
    assert int(kwargs["shm_size"].rstrip("g")) >= 8
    assert job["env"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "AWS_SECRET_ACCESS_KEY" not in job["env"]
    compose_volumes = set(_compose()["volumes"])
    assert {volume.split(":")[0] for volume in job["volumes"]} <= compose_volumes
    assert job["networks"] == [_compose()["networks"]["default"]["name"]]


def test_kubernetes_job_template_has_gpus_and_memory_backed_shm() -> None:
    template = json.loads(K8S_TEMPLATE.read_text())
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    variables = template["variables"]["properties"]
    for placeholder in re.findall(r"\{\{ (\w+) \}\}", K8S_TEMPLATE.read_text()):
        assert placeholder in variables, placeholder
    k8s = [d for d in _deployments() if d["work_pool"]["name"] in ("gpu-k8s", "cpu-k8s")]
    for deployment in k8s:
        assert set(deployment["work_pool"]["job_variables"]) <= set(variables)


def test_deploy_script_is_valid_bash() -> None:
    script = ROOT / "deploy" / "deploy.sh"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    assert script.stat().st_mode & 0o111, "deploy.sh must be executable"
