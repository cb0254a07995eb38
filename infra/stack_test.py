"""`make stack-test`: the containerised path end to end, as a user runs it (README "Local stack").

Brings up infra/docker-compose.yml (images from `make images`), deploys the docker variant of
deploy/prefect.yaml, runs the production deployment ``finetune/cityscapes`` on the demo recipe (the same
job template; only the job variable ``container_create_kwargs`` differs: no GPU device request) and
checks what the README promises: flow-run containers of the project image started by the docker worker,
as the non-root user, on the named volumes; a champion in MLflow above the baseline; its ONNX and PyTorch
artifacts in the bucket (listed with the least-privilege key); host-side inference through the MLflow
server; a second run that skips data preparation and registers exactly one new version while the MLflow
container restarts; nothing lost across `docker compose down` / `up`; no sentinel secret anywhere.

Exits non-zero on the first failed check; prints every command it runs and each phase's duration.
Run from the repository root with the project's venv: ``.venv/bin/python infra/stack_test.py``.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".cache" / "stack-test"
ENV_FILE = WORK / "stack.env"
COMPOSE = ["docker", "compose", "-f", "infra/docker-compose.yml", "--env-file", str(ENV_FILE)]
IMAGE = os.environ.get("CITYSEG_IMAGE", "cityseg-ops:latest")
MODEL = "cityscapes-deeplabv3"
BUCKET = "cityseg"
PREFECT_API = "http://127.0.0.1:4200/api"
MLFLOW_URI = "http://127.0.0.1:5000"
S3_ENDPOINT = "http://127.0.0.1:8333"
# Fewer epochs than the recipe's 40: enough to beat the untrained baseline, and CI time matters.
OVERRIDES = ["orchestration.stage_deployments.prepare=prepare-data/cityscapes", "train.epochs=12"]
# Production's job variables minus the GPU device request (the CPU run's only difference).
CPU_JOB_VARIABLES = 'container_create_kwargs={"shm_size": "1g"}'
RUN_CMD = [
    "prefect", "deployment", "run", "finetune/cityscapes", "--param", "recipe=demo",
    "--param", f"overrides={json.dumps(OVERRIDES)}", "--job-variable", CPU_JOB_VARIABLES,
    "--watch", "--watch-interval", "5", "--watch-timeout", "1500",
]  # fmt: skip
TOOLS = ROOT / ".cache" / "stack-tools"  # prefect-docker for `prefect deploy` (not in the lock)
ARTIFACT_KEYS = {
    "iou-baseline-vs-finetuned",
    "mlflow-training-run",
    "registered-model-version",
    "finetune-summary",
}


class CheckFailed(AssertionError):
    pass


def check(condition: bool, what: str) -> None:
    if not condition:
        raise CheckFailed(what)
    print(f"  ok: {what}", flush=True)


@contextmanager
def phase(name: str) -> Iterator[None]:
    print(f"\n== {name}", flush=True)
    start = time.monotonic()
    yield
    print(f"== {name}: {time.monotonic() - start:.0f} s", flush=True)


def host_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_"))}
    bin_dir = str(Path(sys.executable).parent)
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=f"{TOOLS}{os.pathsep}{ROOT}",
        PREFECT_API_URL=PREFECT_API,
        PREFECT_HOME=str(WORK / "prefect-home"),
        MLFLOW_TRACKING_URI=MLFLOW_URI,
        CITYSEG_IMAGE=IMAGE,
    )
    return env


def sh(
    *args: str, timeout: float = 1800, check_rc: bool = True, quiet: bool = False, stdin: str | None = None
) -> str:
    print("$ " + " ".join(args), flush=True)
    result = subprocess.run(
        args,
        cwd=ROOT,
        env=host_env(),
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    out = result.stdout + result.stderr
    if not quiet or result.returncode:
        print(out[-6000:], flush=True)
    if check_rc and result.returncode:
        raise CheckFailed(f"{args[0]} {' '.join(args[1:3])} exited {result.returncode}")
    return out


def write_env(sentinel: str) -> dict[str, str]:
    """Fresh random credentials; the pipeline's S3 secret doubles as the sentinel that must leak nowhere."""
    values = {
        "POSTGRES_USER": "cityseg",
        "POSTGRES_PASSWORD": secrets.token_hex(16),
        "S3_BUCKET": BUCKET,
        "S3_ADMIN_ACCESS_KEY": "admin" + secrets.token_hex(6),
        "S3_ADMIN_SECRET_KEY": secrets.token_hex(20),
        "AWS_ACCESS_KEY_ID": "pipeline" + secrets.token_hex(6),
        "AWS_SECRET_ACCESS_KEY": sentinel,
        "AWS_DEFAULT_REGION": "us-east-1",
        "CITYSEG_IMAGE": IMAGE,
    }
    WORK.mkdir(parents=True, exist_ok=True)
    ENV_FILE.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    ENV_FILE.chmod(0o600)
    return values


class ContainerWatcher:
    """Records `docker inspect` and the full log of every flow-run container (project image) while the
    runs go on: the docker worker removes them when they exit (auto_remove)."""

    def __init__(self) -> None:
        self.seen: dict[str, dict[str, Any]] = {}
        self.logs: dict[str, Path] = {}
        self._stop = threading.Event()
        self._followers: list[subprocess.Popen] = []
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> ContainerWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for follower in self._followers:
            follower.wait(timeout=60)

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            ids = subprocess.run(
                ["docker", "ps", "-q", "--no-trunc", "--filter", f"ancestor={IMAGE}"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.split()
            for cid in ids:
                if cid in self.seen:
                    continue
                inspected = subprocess.run(["docker", "inspect", cid], capture_output=True, text=True)
                if inspected.returncode:
                    continue
                self.seen[cid] = json.loads(inspected.stdout)[0]
                self.logs[cid] = WORK / f"container-{cid[:12]}.log"
                with self.logs[cid].open("wb") as log:
                    self._followers.append(
                        subprocess.Popen(["docker", "logs", "-f", cid], stdout=log, stderr=subprocess.STDOUT)
                    )


def prefect_call(function: Callable[[Any], Any]) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: PREFECT_API}), get_client(sync_client=True) as client:
        return function(client)


def flow_runs() -> list[Any]:
    return sorted(prefect_call(lambda c: c.read_flow_runs()), key=lambda r: r.created)


def flow_names() -> dict[Any, str]:
    return {f.id: f.name for f in prefect_call(lambda c: c.read_flows())}


def restart_mlflow_during_registration(done: threading.Event, restarted: list[str]) -> None:
    """Restart the MLflow container as soon as a register-model flow run is Running."""
    while not done.wait(2):
        try:
            names = flow_names()
            running = [r for r in flow_runs() if names.get(r.flow_id) == "register-model"]
            running = [r for r in running if r.state_name == "Running"]
        except Exception:  # the API may be busy; try again
            continue
        if running:
            print(f"  register-model flow run {running[-1].id} is Running: restarting MLflow", flush=True)
            subprocess.run([*COMPOSE, "restart", "mlflow"], cwd=ROOT, check=True, timeout=300)
            restarted.append(str(running[-1].id))
            return


def main() -> int:
    from mlflow import MlflowClient

    os.chdir(ROOT)
    sentinel = "stack-sentinel-" + secrets.token_hex(12)
    cityscapes_sentinel = "cityscapes-sentinel-" + secrets.token_hex(8)
    total = time.monotonic()

    with phase("stack up (fresh volumes)"):
        sh(
            *COMPOSE[:4],
            "--env-file",
            "infra/.env.example",
            "down",
            "--volumes",
            "--remove-orphans",
            check_rc=False,
            quiet=True,
        )
        # The flow-run containers' volumes are created by Docker on first use, not by compose, so
        # `down --volumes` keeps them: a stale runs/ would resume the last test's training.
        sh("docker", "volume", "rm", "--force", "cityseg-runs", "cityseg-data", quiet=True)
        creds = write_env(sentinel)
        sh(*COMPOSE, "up", "-d", "--wait", timeout=900)

    import boto3
    import requests
    from botocore.exceptions import ClientError

    def s3(key_id: str | None, secret: str | None) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=S3_ENDPOINT,
            region_name="us-east-1",
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
        )

    pipeline_s3 = s3(creds["AWS_ACCESS_KEY_ID"], creds["AWS_SECRET_ACCESS_KEY"])
    with phase("S3 store: private bucket, least-privilege key"):
        listed = pipeline_s3.list_objects_v2(Bucket=BUCKET)
        check(listed["KeyCount"] == 0, "the pipeline key lists the (empty) bucket")
        anonymous = s3("anonymous", "anonymous")
        for what, call in [
            ("the pipeline key cannot create buckets", lambda: pipeline_s3.create_bucket(Bucket="other")),
            ("an unknown key cannot list the bucket", lambda: anonymous.list_objects_v2(Bucket=BUCKET)),
        ]:
            try:
                call()
                raise CheckFailed(what)
            except ClientError:
                check(True, what)
        status = requests.get(f"{S3_ENDPOINT}/{BUCKET}", timeout=10).status_code
        check(status == 403, f"an unsigned request for the bucket is refused ({status})")

    with phase("deploy the docker variant"):
        sh("deploy/deploy.sh", "docker", timeout=600)
        # Secrets live in Secret blocks, never in parameters; the sentinel must not leak from them.
        # (read from stdin, so that the command line printed here does not carry it)
        sh(
            sys.executable,
            "-c",
            "from prefect.blocks.system import Secret; import sys; "
            "Secret(value=sys.stdin.read()).save('cityscapes-password', overwrite=True)",
            quiet=True,
            stdin=cityscapes_sentinel,
        )

    with ContainerWatcher() as watcher:
        with phase("run 1: prefect deployment run finetune/cityscapes --watch (demo recipe, CPU)"):
            sh(*RUN_CMD, timeout=1800)
        client = MlflowClient(MLFLOW_URI)
        with phase("run 1: checks"):
            runs = flow_runs()
            names = flow_names()
            (parent,) = [r for r in runs if names[r.flow_id] == "finetune"]
            check(parent.state_name == "Completed", f"flow run {parent.name} is Completed")
            artifacts = prefect_call(lambda c: c.read_artifacts())
            keys = {a.key for a in artifacts if a.flow_run_id == parent.id}
            check(keys >= ARTIFACT_KEYS, f"Prefect artifacts {sorted(ARTIFACT_KEYS)}")
            champion = client.get_model_version_by_alias(MODEL, "champion")
            val, base = float(champion.tags["val_miou"]), float(champion.tags["baseline_miou"])
            check(
                champion.version == "1" and val > base,
                f"{MODEL} v{champion.version} is @champion: val_miou {val:.4f} > baseline {base:.4f}",
            )
            objects = [
                o["Key"]
                for page in pipeline_s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
                for o in page.get("Contents", [])
            ]
            check(any(k.endswith(".onnx") for k in objects), "ONNX model objects in the bucket")
            check(any(k.endswith(".pth") for k in objects), "PyTorch model objects in the bucket")
            onnx = [k for k in objects if k.endswith(".onnx")]
            print(f"  {len(objects)} objects in s3://{BUCKET}, e.g. {onnx[:2]}")

        with phase("host-side inference through the MLflow server"):
            inputs, outputs = WORK / "predict-in", WORK / "predict-out"
            sh(
                sys.executable,
                "-c",
                "import sys, numpy as np, cv2; from pathlib import Path; d = Path(sys.argv[1]); "
                "d.mkdir(parents=True, exist_ok=True); rng = np.random.default_rng(0); "
                "[cv2.imwrite(str(d / f'img{i}.png'), rng.integers(0, 255, (128, 256, 3), np.uint8)) "
                "for i in range(3)]",
                str(inputs),
                quiet=True,
            )
            sh(
                sys.executable,
                "-m",
                "components.predict",
                "--model",
                f"models:/{MODEL}@champion",
                "--input",
                str(inputs),
                "--output",
                str(outputs),
                "--cpu",
            )
            masks = sorted((outputs / "trainIds").glob("*.png"))
            check(len(masks) == 3, f"one mask per input ({len(masks)} for 3)")

        with phase("run 2: same deployment; MLflow restarted while registering"):
            done, restarted = threading.Event(), []
            restarter = threading.Thread(target=restart_mlflow_during_registration, args=(done, restarted))
            restarter.start()
            try:
                sh(*RUN_CMD, timeout=1800)
            finally:
                done.set()
                restarter.join()
        with phase("run 2: checks"):
            check(bool(restarted), "MLflow was restarted during registration")
            runs, names = flow_runs(), flow_names()
            parents = [r for r in runs if names[r.flow_id] == "finetune"]
            check(len(parents) == 2 and parents[-1].state_name == "Completed", "second flow run Completed")
            prepares = [r for r in runs if names[r.flow_id] == "prepare-data"]
            tasks = prefect_call(lambda c: c.read_task_runs())
            second = [t.state_name for t in tasks if t.flow_run_id == prepares[-1].id and "prepare" in t.name]
            check(second == ["Skipped"], f"the second run's data preparation was skipped ({second})")
            versions = client.search_model_versions(f"name = '{MODEL}'")
            training_runs = [v.tags.get("training_run_id") for v in versions]
            check(len(versions) == 2 and len(set(training_runs)) == 2, "exactly one version per training run")
            newest = max(versions, key=lambda v: int(v.version))
            decision = newest.tags.get("promotion")
            check(decision is not None, f"v{newest.version} records its promotion decision: {decision}")

    with phase("flow-run containers"):
        containers = list(watcher.seen.values())
        check(
            len(containers) >= 4, f"{len(containers)} flow-run containers of {IMAGE} (finetune, prepare x 2)"
        )
        for c in containers:
            mounts = {m.get("Name") for m in c["Mounts"]}
            labels = c["Config"]["Labels"] or {}
            check(
                c["Config"]["Image"] == IMAGE
                and c["Config"]["User"].split(":")[0] == "10001"
                and {"cityseg-runs", "cityseg-data"} <= mounts
                and any(k.startswith("io.prefect") for k in labels),
                f"{c['Name']}: image {IMAGE}, user {c['Config']['User']}, "
                f"volumes {sorted(m for m in mounts if m)}, started by the Prefect docker worker",
            )
            gpus = c["HostConfig"].get("DeviceRequests")
            check(not gpus, f"{c['Name']}: no GPU device request (the CPU job variables)")

    with phase("docker compose down, then up: nothing lost"):
        sh(*COMPOSE, "down", timeout=600)
        sh(*COMPOSE, "up", "-d", "--wait", timeout=900)
        versions = MlflowClient(MLFLOW_URI).search_model_versions(f"name = '{MODEL}'")
        check(len(versions) == 2, "both model versions are still registered")
        champion = MlflowClient(MLFLOW_URI).get_model_version_by_alias(MODEL, "champion")
        check(champion.version in {"1", "2"}, f"@champion still resolves (v{champion.version})")
        objects = pipeline_s3.list_objects_v2(Bucket=BUCKET).get("KeyCount", 0)
        check(objects > 0, f"artifacts still in the bucket ({objects}+ objects)")
        names = flow_names()
        check(len([r for r in flow_runs() if names[r.flow_id] == "finetune"]) == 2, "Prefect history kept")

    with phase("no secret anywhere"):
        haystacks = {"docker compose logs": sh(*COMPOSE, "logs", "--no-color", quiet=True)}
        for cid, c in watcher.seen.items():
            haystacks[f"docker inspect {c['Name']}"] = json.dumps(c)
            haystacks[f"docker logs {c['Name']}"] = watcher.logs[cid].read_text(errors="replace")
        client = MlflowClient(MLFLOW_URI)
        for experiment in client.search_experiments():
            for run in client.search_runs([experiment.experiment_id]):
                haystacks[f"MLflow run {run.info.run_id} params/tags"] = json.dumps(
                    [run.data.params, run.data.tags]
                )
        for version in client.search_model_versions(f"name = '{MODEL}'"):
            haystacks[f"MLflow {MODEL} v{version.version} tags"] = json.dumps(version.tags)
        for run in flow_runs():
            haystacks[f"Prefect flow run {run.name} parameters"] = json.dumps(run.parameters, default=str)
        for where, text in haystacks.items():
            for secret in (sentinel, cityscapes_sentinel):
                if secret in text:
                    raise CheckFailed(f"a sentinel secret leaked into {where}")
        check(len(haystacks) > 10, f"no sentinel secret in {len(haystacks)} places (logs, inspect, params)")

    print(f"\nstack test passed in {time.monotonic() - total:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CheckFailed as failure:
        print(f"\nSTACK TEST FAILED: {failure}", file=sys.stderr, flush=True)
        subprocess.run([*COMPOSE, "ps", "-a"], cwd=ROOT, check=False)
        subprocess.run([*COMPOSE, "logs", "--tail", "40", "--no-color"], cwd=ROOT, check=False)
        sys.exit(1)
