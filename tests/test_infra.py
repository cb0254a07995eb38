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


DOCKERFILES = [
    "Dockerfile",
    "infra/mlflow/Dockerfile",
    "infra/prefect/Dockerfile",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "infra" / "images").glob("*.Dockerfile")),
]
# A pinned image reference: a tag with a version number, never latest.
PINNED = re.compile(r"^[\w.\-/]+:v?\d+(\.\d+)*(-[\w.]+)?$")


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_is_clean(dockerfile: str) -> None:
    result = subprocess.run([str(HADOLINT), dockerfile], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_every_base_is_a_pinned_build_arg_and_no_frontend_is_pulled(dockerfile: str) -> None:
    text = (ROOT / dockerfile).read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I), "no frontend image from a registry"
    assert "<<" not in text, "heredocs need a newer frontend than the classic builder"
    defaults = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    stages: set[str] = set()
    for image, stage in re.findall(r"^FROM (\S+)(?: AS (\w+))?$", text, re.M):
        if image not in stages:
            arg = re.fullmatch(r"\$\{(\w+)\}", image)
            assert arg, f"{dockerfile}: FROM {image} is not a build arg"
            assert PINNED.match(defaults[arg.group(1)]), f"{dockerfile}: {arg.group(1)} is not pinned"
        stages.add(stage)


def test_image_is_multi_stage_pinned_and_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=debian:12\.\d+-slim$", text, re.M)  # bookworm: Python 3.11
    final = _final_stage(text)
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users, "the final stage must switch to a non-root USER"
    assert users[-1].split(":")[0] not in ("root", "0")
    final_text = "\n".join(final)
    assert "pip install" not in final_text and "EXTRA_CA_CERT" not in final_text, "build-only steps"
    assert "pip uninstall -y pip" in text, "no pip in the copied venv"
    assert "GIT_COMMIT=${GIT_COMMIT}" in final_text and "ARG GIT_COMMIT" in final_text
    assert "ARG BAKE_WEIGHTS=false" in text and "TORCH_HOME=/opt/torch" in final_text
    assert "requirements.lock" in text
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".cache", "runs", "data", "tests", "infra/.env"} <= ignored


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_images_are_pinned_variables() -> None:
    for name, service in _compose()["services"].items():
        match = re.fullmatch(r"\$\{(\w+)_IMAGE:-([^}]+)\}", service["image"])
        assert match, f"{name}: image {service['image']} is not a variable with a default"
        assert PINNED.match(match.group(2)), f"{name}: {match.group(2)} is not pinned"
    for path in [*ROOT.glob("infra/**/*"), *ROOT.glob("deploy/*")]:
        if path.is_file():
            assert "minio" not in path.read_text().lower(), f"{path} still refers to MinIO"


def test_compose_services_healthchecks_and_volumes() -> None:
    compose = _compose()
    services = compose["services"]
    expected = {
        "postgres", "seaweedfs", "seaweedfs-init", "mlflow", "prefect-server",
        "prefect-worker-gpu", "prefect-worker-cpu",
    }  # fmt: skip
    assert expected == set(services)
    for name, service in services.items():
        if name != "seaweedfs-init":  # a one-shot job
            assert "healthcheck" in service, f"{name} has no healthcheck"
            assert service["restart"] == "unless-stopped", name
    assert {"postgres-data", "seaweedfs-data", "cityseg-runs", "cityseg-data"} <= set(compose["volumes"])
    assert services["postgres"]["volumes"][0].startswith("postgres-data:")
    assert services["seaweedfs"]["volumes"][0].startswith("seaweedfs-data:")
    mlflow_env = services["mlflow"]["environment"]
    assert mlflow_env["MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD"] == "true"
    assert mlflow_env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"].startswith(
        "postgresql+psycopg2://"
    )  # SQLAlchemy 2.1 defaults to psycopg 3
    assert mlflow_env["MLFLOW_S3_ENDPOINT_URL"] == "http://seaweedfs:8333"
    assert services["mlflow"]["depends_on"]["seaweedfs-init"]["condition"] == "service_completed_successfully"
    assert (
        "postgresql+asyncpg://"
        in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    )
    gpu_worker = " ".join(services["prefect-worker-gpu"]["command"])
    assert "--pool gpu-docker --type docker" in gpu_worker
    init_script = services["seaweedfs-init"]["command"][0]
    # A private bucket and a key limited to it; weed shell's output (it echoes keys) is discarded.
    assert "s3.bucket.create -name $$S3_BUCKET" in init_script
    assert "-buckets $$S3_BUCKET -actions Read,Write,List,Tagging" in init_script
    assert ">/dev/null 2>&1" in init_script
    assert "S3_ADMIN_SECRET_KEY" not in json.dumps(services["mlflow"])  # the pipeline never sees root keys


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
    assert {
        "predict-shard/cityscapes",
        "predict-shard/cityscapes-k8s",
        "predict-shard/cityscapes-local",
    } <= full_names
    for deployment in deployments:
        parameters = deployment["parameters"]
        if "recipe" in parameters:  # the pipeline's flows (predict takes a model URI instead)
            cfg = load_config(parameters["recipe"], parameters.get("overrides", []))
            for stage_deployment in cfg.orchestration.stage_deployments.values():
                assert stage_deployment in full_names, (
                    f"{deployment['name']} calls unknown {stage_deployment}"
                )
        if "shard_deployment" in parameters:  # the predict flow's shards
            assert parameters["shard_deployment"] in full_names
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


def test_no_flow_module_shadows_the_standard_library() -> None:
    # Prefect puts an entrypoint's directory (flows/) on sys.path, and spawned worker processes inherit
    # it: flows/secrets.py once replaced the stdlib `secrets` in every trainId worker of a flow-run container.
    modules = {path.stem for path in (ROOT / "flows").glob("*.py")}
    assert not modules & set(sys.stdlib_module_names)
