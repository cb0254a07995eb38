"""`make stack-test`: the containerised path end to end, as a user runs it (docs/local-stack.md).

Brings up infra/docker-compose.yml (images from `make images`), deploys the docker variant of
deploy/prefect.yaml, runs the production deployment ``finetune/cityscapes`` on the demo recipe (the same
job template; only the job variable ``container_create_kwargs`` differs: no GPU device request) and
checks what the docs promise: flow-run containers of the project image started by the docker worker,
as the non-root user, on the named volumes; a champion in MLflow above the baseline; its ONNX and PyTorch
artifacts in the bucket (listed with the least-privilege key); host-side inference through the MLflow
server; a second run whose flow-run container is SIGKILLed mid-training: Crashed in Prefect, one alert
(deploy/automations.yaml) at a webhook receiver on the stack's network, then `prefect flow-run retry`
resumes training, skips data preparation and registers exactly one new version while the MLflow container
restarts, and MLflow holds one finished pipeline run for the flow run, nothing left RUNNING; nothing lost
across `docker compose down` / `up`; no sentinel secret anywhere (webhook payloads included).

Exits non-zero on the first failed check; prints every command it runs and each phase's duration.
Run from the repository root with the project's venv: ``.venv/bin/python infra/stack_test.py``.
"""

from __future__ import annotations

import json
import os
import re
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
# Production's job variables minus the GPU device request (the CPU run's only difference).
CPU_JOB_VARIABLES = 'container_create_kwargs={"shm_size": "1g"}'
# Fewer epochs than the recipe's 36: enough to beat the untrained baseline, and CI time matters.
RUN1_EPOCHS = 12
# The killed-and-retried run: killed once KILL_AFTER_EPOCH is in MLflow (so that epoch's checkpoint,
# written before the next epoch's metrics, has landed), then resumed.
RUN2_EPOCHS, KILL_AFTER_EPOCH = 6, 2
FLOW_RUN_TAG = "prefect_flow_run_id"  # components.tracking.FLOW_RUN_TAG: a pipeline run's flow run
ALERT_AUTOMATION = "cityseg-flow-run-failed"  # deploy/automations.yaml
# The webhook receiver: a container on the stack's network (the Prefect server sends the notification),
# from the Prefect image (python, and no project image: ContainerWatcher follows those).
RECEIVER = "cityseg-alert-receiver"
RECEIVER_IMAGE = os.environ.get("PREFECT_SERVER_IMAGE", "cityseg-prefect:3.9.1")
RECEIVER_CODE = """
import http.server, json
received = []
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # a notification: keep its body (the path holds the token: not logged)
        received.append(self.rfile.read(int(self.headers["Content-Length"])).decode())
        self.send_response(200)
        self.end_headers()
    def do_GET(self):  # the test reads what arrived
        body = json.dumps(received).encode()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("", 8080), Handler).serve_forever()
"""
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
    *args: str,
    timeout: float = 1800,
    check_rc: bool = True,
    quiet: bool = False,
    stdin: str | None = None,
    secret_env: dict[str, str] | None = None,
) -> str:
    """Run a command, print it and (unless ``quiet``) its output; ``secret_env`` is not printed."""
    print("$ " + " ".join(args), flush=True)
    result = subprocess.run(
        args,
        cwd=ROOT,
        env={**host_env(), **(secret_env or {})},
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


def run_command(epochs: int, watch: bool = True) -> list[str]:
    """`prefect deployment run` of the production deployment on the demo recipe, CPU job variables."""
    overrides = ["orchestration.stage_deployments.prepare=prepare-data/cityscapes", f"train.epochs={epochs}"]
    command = [
        "prefect", "deployment", "run", "finetune/cityscapes", "--param", "recipe=demo",
        "--param", f"overrides={json.dumps(overrides)}", "--job-variable", CPU_JOB_VARIABLES,
    ]  # fmt: skip
    return [*command, "--watch", "--watch-timeout", "1500"] if watch else command


def wait_for(what: str, probe: Callable[[], Any], timeout: float, interval: float = 2) -> Any:
    """Poll ``probe`` until it returns something truthy (returned); its exceptions count as not yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if value := probe():
                return value
        except Exception:  # a server restarting or busy: try again
            pass
        time.sleep(interval)
    raise CheckFailed(f"timed out after {timeout:.0f} s waiting for {what}")


def alerts(receiver: str) -> list[str]:
    """The text of each notification the receiver got (the block POSTs {"text": ...})."""
    import requests

    return [json.loads(body)["text"] for body in requests.get(receiver, timeout=10).json()]


def start_receiver() -> str:
    """The webhook receiver container on the stack's network; returns where the host reads what it got."""
    sh("docker", "rm", "--force", RECEIVER, quiet=True)
    sh(
        "docker", "run", "--detach", "--name", RECEIVER, "--network", "cityseg",
        "--publish", "127.0.0.1::8080", RECEIVER_IMAGE, "python", "-c", RECEIVER_CODE, quiet=True,
    )  # fmt: skip
    address = sh("docker", "port", RECEIVER, "8080/tcp", quiet=True).split()[0]
    return f"http://{address}/"


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


def prefect_logs() -> list[str]:
    """Every log line in the Prefect server (all flow runs), read a page at a time."""
    from prefect.client.schemas.sorting import LogSort

    def page(offset: int) -> list[str]:
        logs = prefect_call(lambda c: c.read_logs(offset=offset, sort=LogSort.TIMESTAMP_ASC))
        return [log.message for log in logs]

    lines: list[str] = []
    while more := page(len(lines)):
        lines += more
    return lines


def pipeline_runs(client: Any, flow_run_id: str) -> list[Any]:
    """The MLflow pipeline (parent) runs of a flow run, in every experiment."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, f"tags.{FLOW_RUN_TAG} = '{flow_run_id}'")


def stage_runs(client: Any, parent: Any) -> dict[str, Any]:
    """A pipeline run's stage runs by kind: baseline, train, finetuned (run names baseline-*, train-*)."""
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    kinds: dict[str, Any] = {}
    for child in children:
        kind = child.info.run_name.split("-")[0]
        if kind in kinds:
            raise CheckFailed(f"two {kind} runs under pipeline run {parent.info.run_id}")
        kinds[kind] = child
    return kinds


def last_epoch(client: Any, flow_run_id: str) -> int:
    """The newest epoch the flow run's training has logged to MLflow (0: none yet)."""
    parents = pipeline_runs(client, flow_run_id)
    train = stage_runs(client, parents[0]).get("train") if parents else None
    if train is None:
        return 0
    steps = [m.step for key in train.data.metrics for m in client.get_metric_history(train.info.run_id, key)]
    return max(steps, default=0)


def check_lineage(client: Any, flow_run_id: str, epochs: int) -> None:
    """One finished pipeline run for the (crashed, then retried) flow run, holding its three stages; the
    training resumed (each epoch logged once); nothing left RUNNING; the version comes from that training."""
    parents = pipeline_runs(client, flow_run_id)
    check(
        len(parents) == 1 and parents[0].info.status == "FINISHED",
        f"one MLflow pipeline run for flow run {flow_run_id}, FINISHED ({[p.info.status for p in parents]})",
    )
    stages = stage_runs(client, parents[0])
    check(
        set(stages) >= {"baseline", "train", "finetuned"}
        and all(r.info.status == "FINISHED" for r in stages.values()),
        f"it holds baseline, training and fine-tuned evaluation, FINISHED ({sorted(stages)})",
    )
    train = stages["train"]
    histories = {
        key: [m.step for m in client.get_metric_history(train.info.run_id, key)] for key in train.data.metrics
    }
    twice = {key: steps for key, steps in histories.items() if len(steps) != len(set(steps))}
    check(not twice, f"no epoch logged twice in training run {train.info.run_id} ({twice})")
    logged = max(map(len, histories.values()), default=0)
    check(logged == epochs, f"every epoch logged once: {logged} of {epochs}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    running = client.search_runs(experiments, "attributes.status = 'RUNNING'")
    check(not running, f"no MLflow run left RUNNING ({[r.info.run_name for r in running]})")
    versions = client.search_model_versions(f"tags.training_run_id = '{train.info.run_id}'")
    check(len(versions) == 1, f"one registered version from that training ({[v.version for v in versions]})")


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
    # Webhook URLs carry tokens (Slack's do): one more secret that no notification or log may hold.
    webhook_sentinel = "webhook-sentinel-" + secrets.token_hex(8)
    total = time.monotonic()

    with phase("stack up (fresh volumes)"):
        # (a receiver left by an aborted test would keep `down` from removing the network)
        sh("docker", "rm", "--force", RECEIVER, quiet=True)
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

    with phase("deploy the docker variant, alerts to a webhook receiver"):
        receiver = start_receiver()
        webhook = {"CITYSEG_ALERT_WEBHOOK_URL": f"http://{RECEIVER}:8080/hooks/{webhook_sentinel}"}
        deployed = sh("deploy/deploy.sh", "docker", timeout=600, secret_env=webhook)
        check(f"created automation {ALERT_AUTOMATION}" in deployed, f"deploy.sh created {ALERT_AUTOMATION}")
        # Re-deploying updates the automation in place.
        sh(sys.executable, "deploy/alerts.py", secret_env=webhook)
        automations = prefect_call(lambda c: c.read_automations_by_name(ALERT_AUTOMATION))
        check(len(automations) == 1, f"one automation {ALERT_AUTOMATION} after deploying twice")
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
            sh(*run_command(RUN1_EPOCHS), timeout=1800)
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

        with phase(f"run 2: same deployment; its container SIGKILLed after epoch {KILL_AFTER_EPOCH}"):
            started = sh(*run_command(RUN2_EPOCHS, watch=False))
            flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", started).group(1)

            def trained() -> int | None:
                epoch = last_epoch(client, flow_run_id)
                return epoch if epoch >= KILL_AFTER_EPOCH else None

            def ended() -> Any:
                run = prefect_call(lambda c: c.read_flow_run(flow_run_id))
                return run if run.state.is_final() else None

            epoch = wait_for(f"epoch {KILL_AFTER_EPOCH} of flow run {flow_run_id} in MLflow", trained, 1200)
            label = f"label=io.prefect.flow-run-id={flow_run_id}"
            container = sh("docker", "ps", "--quiet", "--filter", label, quiet=True).split()
            check(len(container) == 1, f"epoch {epoch} logged: one flow-run container to kill ({container})")
            sh("docker", "kill", "--signal", "KILL", container[0])
            killed = time.monotonic()
            crashed = wait_for("Prefect to mark the flow run Crashed", ended, 300)
            check(
                crashed.state_name == "Crashed", f"Crashed {time.monotonic() - killed:.0f} s after the kill"
            )
            notes = wait_for("the alert at the webhook receiver", lambda: alerts(receiver), 120)
            print(f"  alert {time.monotonic() - killed:.0f} s after the kill:\n{notes[0]}", flush=True)

        with phase("run 2: prefect flow-run retry; MLflow restarted while registering"):
            sh("prefect", "flow-run", "retry", flow_run_id)
            done, restarted = threading.Event(), []
            restarter = threading.Thread(target=restart_mlflow_during_registration, args=(done, restarted))
            restarter.start()
            try:
                # (not `prefect flow-run watch`: right after a retry it replays the killed attempt's
                # Crashed event and stops)
                retried = wait_for("the retried flow run to end", ended, 1500, interval=5)
            finally:
                done.set()
                restarter.join()
        with phase("run 2: checks"):
            check(bool(restarted), "MLflow was restarted during registration")
            runs, names = flow_runs(), flow_names()
            parents = [r for r in runs if names[r.flow_id] == "finetune"]
            check(
                len(parents) == 2 and retried.state_name == "Completed" and retried.run_count == 2,
                f"the second flow run {retried.state_name} on its retry (run count {retried.run_count})",
            )
            # The killed attempt's in-process stage (subflow) runs are continued by the retry, not stale.
            stale = [
                f"{names[r.flow_id]} {r.name} {r.state_name}" for r in runs if r.state_name != "Completed"
            ]
            check(not stale, f"every flow run Completed, none left Running ({stale})")
            notes = alerts(receiver)
            check(len(notes) == 1, f"exactly one alert ({len(notes)}): the crash, not the retry")
            url = f"http://127.0.0.1:4200/runs/flow-run/{flow_run_id}"
            check(
                all(part in notes[0] for part in (parents[-1].name, "is Crashed", url)),
                f"the alert names the flow run {parents[-1].name}, its state Crashed and its URL {url}",
            )
            prepares = [r for r in runs if names[r.flow_id] == "prepare-data"]
            tasks = prefect_call(lambda c: c.read_task_runs())
            second = [t.state_name for t in tasks if t.flow_run_id == prepares[-1].id and "prepare" in t.name]
            check(second == ["Skipped"], f"the second run's data preparation was skipped ({second})")
            check_lineage(client, flow_run_id, RUN2_EPOCHS)
            # (the training stage logs into its own subflow run: search every flow run's logs)
            resumed = [m for line in prefect_logs() if (m := re.search(r"resuming after epoch (\d+)", line))]
            check(
                len(resumed) == 1 and int(resumed[0].group(1)) >= 1,
                f"training resumed after epoch {resumed[0].group(1) if resumed else '?'} (Prefect logs)",
            )
            versions = client.search_model_versions(f"name = '{MODEL}'")
            training_runs = [v.tags.get("training_run_id") for v in versions]
            check(len(versions) == 2 and len(set(training_runs)) == 2, "exactly one version per training run")
            newest = max(versions, key=lambda v: int(v.version))
            decision = newest.tags.get("promotion")
            check(decision is not None, f"v{newest.version} records its promotion decision: {decision}")

    with phase("flow-run containers"):
        containers = list(watcher.seen.values())
        check(
            len(containers) >= 6,
            f"{len(containers)} flow-run containers of {IMAGE} (finetune x 3 with the retry, prepare x 3)",
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
        sh("docker", "rm", "--force", RECEIVER, quiet=True)  # not part of the stack
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
        haystacks.update({f"alert {i}": note for i, note in enumerate(notes)})
        haystacks["Prefect logs"] = "\n".join(prefect_logs())
        blocks = prefect_call(lambda c: c.read_block_documents(include_secrets=False))
        haystacks["Prefect blocks (API)"] = json.dumps([b.model_dump(mode="json") for b in blocks])
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
            for secret in (sentinel, cityscapes_sentinel, webhook_sentinel):
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
