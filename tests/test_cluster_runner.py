"""Running a job on Kubernetes (components/cluster/: runner, api, logs, status): state read from real
``kubernetes.client`` models, the result read from a real S3 endpoint (moto), and whole runs of
``train_on_cluster`` through the real ``kubernetes`` client against tests/kubestub.py, a stub API server on
which the test plays the Job controller. No Kubernetes cluster runs here: scheduling, the Job controller,
RBAC and DNS are not tested."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import pytest
from kubernetes import client

from components import storage
from components.cluster import api as cluster_api
from components.cluster import logs as cluster_logs
from components.cluster import runner, train_on_cluster
from components.cluster.manifests import rbac_manifests
from components.cluster.names import job_name
from components.cluster.status import JobState, job_state, pod_waiting_reason
from components.config import load_config
from components.errors import ConfigError
from components.train_contract import (
    EpochProgress,
    TrainingError,
    TrainingInterrupted,
    TrainResult,
    read_result,
)
from tests.kubestub import ROUTE, KubeStub

NS = "cityseg"
JOBS = f"/apis/batch/v1/namespaces/{NS}/jobs"
SERVICES = f"/api/v1/namespaces/{NS}/services"
PODS = f"/api/v1/namespaces/{NS}/pods"
TRAINJOBS = f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NS}/trainjobs"
OUTPUT = "s3://cityseg/runs/flow-runs/0b9e/train"
RUN_NAME = "strong-resnet50-train"


# --- state from real kubernetes.client models -------------------------------------------------------


def _job(*conditions: tuple[str, str, str | None], **counts: int) -> client.V1Job:
    return client.V1Job(
        metadata=client.V1ObjectMeta(name="ft-1"),
        status=client.V1JobStatus(
            conditions=[
                client.V1JobCondition(type=kind, status=value, reason=reason, message=f"{reason} message")
                for kind, value, reason in conditions
            ]
            or None,
            **counts,
        ),
    )


def test_job_state_from_v1job_conditions():
    running = job_state(_job(active=2, ready=1))
    assert not running.finished and running.summary == "2 active, 1 ready, 0 succeeded, 0 failed"
    assert job_state(client.V1Job(metadata=client.V1ObjectMeta(name="new"))).finished is False
    done = job_state(_job(("SuccessCriteriaMet", "True", "CompletionsReached"), ("Complete", "True", None)))
    assert done.finished and done.succeeded
    # FailureTarget comes first, while pods still terminate: not finished until Failed is true.
    assert not job_state(_job(("FailureTarget", "True", "BackoffLimitExceeded"))).finished
    failed = job_state(
        _job(("FailureTarget", "True", "BackoffLimitExceeded"), ("Failed", "True", "BackoffLimitExceeded"))
    )
    assert (failed.finished, failed.succeeded, failed.reason) == (True, False, "BackoffLimitExceeded")
    assert not job_state(_job(("Complete", "False", None))).finished
    assert not job_state(_job(("Suspended", "True", "JobSuspended"))).finished


def test_trainjob_state_from_its_conditions():
    trainjob = {"status": {"conditions": [{"type": "Created", "status": "True"}]}}
    assert not job_state(trainjob).finished and job_state(trainjob).summary == "Created"
    trainjob["status"]["conditions"].append({"type": "Failed", "status": "True", "reason": "TrainJobFailed"})
    assert job_state(trainjob) == JobState(True, False, "TrainJobFailed", None, "Created, Failed")
    assert not job_state({"metadata": {"name": "x"}}).finished


def test_pod_waiting_reasons_from_v1pod():
    def pod(phase, conditions=None, waiting=None):
        statuses = None
        if waiting:
            state = client.V1ContainerState(waiting=client.V1ContainerStateWaiting(**waiting))
            statuses = [client.V1ContainerStatus(name="trainer", image="i", image_id="", ready=False,
                                                 restart_count=0, state=state)]  # fmt: skip
        return client.V1Pod(status=client.V1PodStatus(phase=phase, conditions=conditions,
                                                      container_statuses=statuses))  # fmt: skip

    unschedulable = client.V1PodCondition(
        type="PodScheduled",
        status="False",
        reason="Unschedulable",
        message="0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
    )
    assert pod_waiting_reason(pod("Pending", [unschedulable])) == (
        "not scheduled: Unschedulable: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    )
    pulling = {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "reg/cityseg-ops:1"'}
    assert pod_waiting_reason(pod("Pending", None, pulling)).startswith("ImagePullBackOff: Back-off")
    assert pod_waiting_reason(pod("Pending", None, {"reason": "ContainerCreating"})) == "ContainerCreating"
    assert pod_waiting_reason(pod("Running")) is None
    assert pod_waiting_reason(pod("Failed")) is None


# --- the result on S3 -------------------------------------------------------------------------------


def test_the_result_is_read_from_the_s3_output_dir(s3_endpoint):
    storage.s3_client().create_bucket(Bucket="cityseg")
    with pytest.raises(TrainingError, match=r"train_result\.json cannot be read"):
        read_result(OUTPUT, "job cityseg/ft-1")
    expected = _result()
    storage.write_bytes(storage.join(OUTPUT, "train_result.json"), json.dumps(asdict(expected)).encode())
    assert read_result(OUTPUT) == expected


def _result() -> TrainResult:
    return TrainResult(f"{OUTPUT}/best.pt", f"{OUTPUT}/epoch_0002.pt", 0.61, "mlflow-run-1", 2)


# --- cluster access ---------------------------------------------------------------------------------


def test_without_a_cluster_the_error_says_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(
        "kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "missing")
    )
    with pytest.raises(ConfigError, match=r"not in a pod .* no usable kube config"):
        cluster_api.api_client()


def test_a_kube_config_file_is_used_outside_a_pod(monkeypatch, tmp_path):
    config_file = tmp_path / "config"
    config_file.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: k, cluster: {server: 'https://k8s.example:6443'}}]\n"
        "users: [{name: u, user: {token: not-a-real-token}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u, namespace: cityseg}}]\n"
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr("kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", str(config_file))
    api = cluster_api.api_client()
    assert api.configuration.host == "https://k8s.example:6443"


# --- whole runs against the stub API server ------------------------------------------------------------


@pytest.fixture
def stub() -> Iterator[KubeStub]:
    stub = KubeStub()
    with stub.serve() as api:
        stub.api = api  # type: ignore[attr-defined]
        yield stub


@pytest.fixture
def job_env(s3_endpoint, monkeypatch):
    """A tracking server address for the pods and a bucket for the result (moto)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    storage.s3_client().create_bucket(Bucket="cityseg")


def _overrides(*extra: str) -> list[str]:
    return [
        f"train.output_dir={OUTPUT}",
        "orchestration.multinode.enabled=true",
        "orchestration.multinode.image=registry.example/cityseg-ops:1a2b3c",
        *extra,
    ]


def _run(stub: KubeStub, overrides: list[str], **kwargs: Any) -> TrainResult:
    return train_on_cluster(
        "strong",
        overrides,
        run_name=RUN_NAME,
        flow_run_id="0b9e6f3c-5a1d-4a8e-9c0b-6f1e2d3c4b5a",
        api=stub.api,
        poll_s=0.05,
        **kwargs,
    )


def _controller(target: Any) -> threading.Thread:
    """Run the test's part of the Job controller beside the run; its exceptions fail the test."""
    errors: list[BaseException] = []

    def body() -> None:
        try:
            target()
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    return thread


def _pod_labels(name: str) -> dict[str, str]:
    return {"batch.kubernetes.io/job-name": name, "batch.kubernetes.io/job-completion-index": "0"}


def _rank0_succeeds(stub: KubeStub, pod: str) -> None:
    """Rank 0 writes the result to S3 and pod 0's container exits cleanly."""
    storage.write_bytes(f"{OUTPUT}/train_result.json", json.dumps(asdict(_result())).encode())
    stub.end_container(NS, pod, "Succeeded")


def _finish(stub: KubeStub, name: str, kind: str = "Complete", reason: str | None = None) -> None:
    condition = {"type": kind, "status": "True", "reason": reason, "message": f"{reason} message"}
    counts = {"succeeded": 2} if kind == "Complete" else {"failed": 1}
    stub.update(JOBS, name, lambda job: job.setdefault("status", {}).update(conditions=[condition], **counts))


def _assert_the_role_allows_every_call(stub: KubeStub, engine: str) -> None:
    """Each request the run made is granted by `python -m components.cluster --rbac`'s Role."""
    role, _ = rbac_manifests(load_config("strong", [f"orchestration.multinode.engine={engine}"]))
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    for method, path, _ in stub.requests:
        route = ROUTE.match(path)
        group = "" if route["group"] == "api/v1" else route["group"].split("/")[1]
        resource = f"{route['plural']}/log" if route["sub"] else route["plural"]
        verb = {"POST": "create", "DELETE": "delete"}.get(method) or ("get" if route["name"] else "list")
        assert (group, resource, verb) in granted, (method, path)


def _pod_lists(stub: KubeStub) -> list[str]:
    return [path for path in (p for _, p in stub.calls("GET")) if path == PODS]


def _pod0_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "components.cluster.logs" and "[rank" in r.getMessage()
    ]


def test_a_job_runs_to_its_result_with_pod0s_log_relayed_and_is_deleted(stub, job_env, caplog):
    caplog.set_level(logging.INFO, logger="components.cluster")
    name = job_name(RUN_NAME, OUTPUT, 2)

    def controller() -> None:
        stub.wait_for(lambda: stub.get(JOBS, name))
        pod = f"{name}-0-abcde"
        stub.add_pod(
            NS, f"{name}-1-fghij", {**_pod_labels(name), "batch.kubernetes.io/job-completion-index": "1"}
        )
        listed = len(_pod_lists(stub))
        stub.add_pod(NS, pod, _pod_labels(name), phase="Pending")
        creating = {"name": "trainer", "image": "i", "imageID": "", "ready": False, "restartCount": 0}
        creating["state"] = {"waiting": {"reason": "ContainerCreating"}}
        stub.update(PODS, pod, lambda p: p["status"].update(containerStatuses=[creating]))
        stub.wait_for(lambda: len(_pod_lists(stub)) >= listed + 2)  # the follower has seen it pending
        stub.update(PODS, pod, lambda p: p["status"].update(phase="Running", containerStatuses=None))
        stub.log(pod, "[rank 0] epoch 1/2 loss 1.20", "", "[rank 0] epoch 2/2 loss 0.80")
        _rank0_succeeds(stub, pod)
        stub.log(f"{name}-1-fghij", "[rank 8] not relayed: pod 1")
        _finish(stub, name)

    thread = _controller(controller)
    assert _run(stub, _overrides()) == _result()
    thread.join(5)
    assert not thread.errors

    assert _pod0_lines(caplog) == ["[rank 0] epoch 1/2 loss 1.20", "[rank 0] epoch 2/2 loss 0.80"]
    assert any("ContainerCreating" in r.getMessage() for r in caplog.records)
    posted = [path for _, path in stub.calls("POST")]
    assert posted == [JOBS, SERVICES]  # the job first: the Service is owned by it
    service, job = (next(b for b in stub.created if b["kind"] == kind) for kind in ("Service", "Job"))
    assert service["metadata"]["ownerReferences"][0]["kind"] == "Job"
    assert service["metadata"]["ownerReferences"][0]["name"] == name
    labels = job["metadata"]["labels"]
    assert labels["cityseg-ops/flow-run-id"] == "0b9e6f3c-5a1d-4a8e-9c0b-6f1e2d3c4b5a"
    assert labels["cityseg-ops/flow-run-name"] == RUN_NAME
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"} in env
    # The moto credentials are in this process's environment; no manifest carries them.
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in json.dumps(stub.created)
    deletes = [(path, query) for method, path, query in stub.requests if method == "DELETE"]
    assert deletes[-2:] == [
        (f"{JOBS}/{name}", {"propagationPolicy": ["Background"]}),
        (f"{SERVICES}/{name}", {}),
    ]
    assert stub.get(JOBS, name) is None and stub.get(SERVICES, name) is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    _assert_the_role_allows_every_call(stub, "indexed-job")


def test_a_replaced_pod0_and_a_dropped_stream_relay_every_line_once(stub, job_env, caplog):
    caplog.set_level(logging.INFO, logger="components.cluster")
    name = job_name(RUN_NAME, OUTPUT, 2)

    def controller() -> None:
        stub.wait_for(lambda: stub.get(JOBS, name))
        first, second = f"{name}-0-aaaaa", f"{name}-0-bbbbb"
        stub.add_pod(NS, first, _pod_labels(name), created="2026-01-01T10:00:00Z")
        stub.log(first, "[rank 0] a1")
        stub.wait_for(lambda: sum(p.endswith(f"{first}/log") for _, p in stub.calls("GET")) >= 1)
        stub.drop_streams(first)  # the connection breaks, the container still runs
        stub.wait_for(lambda: sum(p.endswith(f"{first}/log") for _, p in stub.calls("GET")) >= 2)
        stub.log(first, "[rank 0] a2")
        stub.end_container(NS, first, "Failed")  # the node is lost; the Job controller replaces pod 0
        stub.add_pod(NS, second, _pod_labels(name), created="2026-01-01T10:05:00Z")
        stub.log(second, "[rank 0] b1 (resumed)")
        _rank0_succeeds(stub, second)
        _finish(stub, name)

    thread = _controller(controller)
    assert _run(stub, _overrides()) == _result()
    thread.join(5)
    assert not thread.errors
    assert _pod0_lines(caplog) == ["[rank 0] a1", "[rank 0] a2", "[rank 0] b1 (resumed)"]


def test_a_failed_job_raises_with_its_reason_and_last_lines_and_is_deleted(stub, job_env):
    name = job_name(RUN_NAME, OUTPUT, 2)

    def controller() -> None:
        stub.wait_for(lambda: stub.get(JOBS, name))
        pod = f"{name}-0-abcde"
        stub.add_pod(NS, pod, _pod_labels(name))
        stub.log(
            pod, "[rank 0] Traceback (most recent call last):", "[rank 0] RuntimeError: CUDA out of memory"
        )
        stub.end_container(NS, pod, "Failed")
        _finish(stub, name, "Failed", "BackoffLimitExceeded")

    thread = _controller(controller)
    with pytest.raises(TrainingError) as failure:
        _run(stub, _overrides())
    thread.join(5)
    assert not thread.errors
    message = str(failure.value)
    assert f"cityseg/{name} failed (BackoffLimitExceeded" in message
    assert "RuntimeError: CUDA out of memory" in message and f"train.output_dir={OUTPUT}" in message
    assert stub.get(JOBS, name) is None and stub.get(SERVICES, name) is None


class _Terminated(BaseException):
    """What Prefect's engine raises for SIGTERM (TerminationSignal), in miniature."""


@pytest.fixture
def sigterm_default() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("owner", ["none", "prefect"])
def test_sigterm_deletes_the_job(stub, job_env, sigterm_default, owner):
    """Cancelling the flow run: SIGTERM becomes an exception (ours, or the one of the handler already
    installed, as Prefect's engine does), and the job and its Service are deleted on the way out."""

    def prefect_like(_signum: int, _frame: Any) -> None:
        raise _Terminated()

    if owner == "prefect":
        signal.signal(signal.SIGTERM, prefect_like)
    name = job_name(RUN_NAME, OUTPUT, 2)

    def controller() -> None:
        stub.wait_for(lambda: stub.get(JOBS, name))
        pod = f"{name}-0-abcde"
        stub.add_pod(NS, pod, _pod_labels(name))
        stub.log(pod, "[rank 0] epoch 1/20")
        stub.wait_for(lambda: any(p.endswith(f"{pod}/log") for _, p in stub.calls("GET")))
        os.kill(os.getpid(), signal.SIGTERM)

    thread = _controller(controller)
    expected = _Terminated if owner == "prefect" else TrainingInterrupted
    with pytest.raises(expected):
        _run(stub, _overrides())
    thread.join(5)
    assert not thread.errors
    assert stub.get(JOBS, name) is None and stub.get(SERVICES, name) is None
    assert f"{JOBS}/{name}" in [p for _, p in stub.calls("DELETE")]
    assert signal.getsignal(signal.SIGTERM) is (prefect_like if owner == "prefect" else signal.SIG_DFL)


def test_a_leftover_job_of_the_same_name_is_replaced_after_its_pods_are_gone(stub, job_env):
    name = job_name(RUN_NAME, OUTPUT, 2)
    stub.put(JOBS, {"kind": "Job", "metadata": {"name": name}, "status": {"active": 2}})
    stub.put(SERVICES, {"kind": "Service", "metadata": {"name": name}})
    stub.add_pod(NS, f"{name}-0-old00", _pod_labels(name))
    stub.delete_delay = 3  # the old job stays while its pods terminate (foreground deletion)

    def controller() -> None:
        stub.wait_for(lambda: stub.calls("POST"))
        stub.wait_for(lambda: stub.get(JOBS, name))
        pod = f"{name}-0-new00"
        stub.add_pod(NS, pod, _pod_labels(name))
        stub.log(pod, "[rank 0] resuming from epoch 7")
        _rank0_succeeds(stub, pod)
        _finish(stub, name)

    thread = _controller(controller)
    assert _run(stub, _overrides()) == _result()
    thread.join(5)
    assert not thread.errors
    calls = stub.requests
    first_delete = next(i for i, (m, p, _) in enumerate(calls) if m == "DELETE" and p == f"{JOBS}/{name}")
    first_post = next(i for i, (m, _, _) in enumerate(calls) if m == "POST")
    assert calls[first_delete][2] == {"propagationPolicy": ["Foreground"]}
    gets_between = [p for m, p, _ in calls[first_delete:first_post] if m == "GET" and p == f"{JOBS}/{name}"]
    assert len(gets_between) >= 4  # it waited for the old job to go before creating the new one


def test_a_job_deleted_by_someone_else_fails_the_run(stub, job_env):
    name = job_name(RUN_NAME, OUTPUT, 2)

    def controller() -> None:
        stub.wait_for(lambda: stub.get(JOBS, name))
        stub.wait_for(lambda: sum(p == f"{JOBS}/{name}" for m, p in stub.calls("GET")) >= 3)
        stub.remove(JOBS, name)

    thread = _controller(controller)
    with pytest.raises(TrainingError, match="disappeared before it ended"):
        _run(stub, _overrides())
    thread.join(5)
    assert stub.get(SERVICES, name) is None


@pytest.mark.parametrize(
    ("reason", "grace_s"),
    [("InvalidImageName", 3600.0), ("ImagePullBackOff", 0.3)],  # never starts; still failing after the grace
)
def test_a_pod_that_cannot_pull_its_image_fails_the_run(stub, job_env, monkeypatch, reason, grace_s):
    monkeypatch.setattr(cluster_logs, "IMAGE_PULL_GRACE_S", grace_s)
    name = job_name(RUN_NAME, OUTPUT, 2)
    waiting = {"reason": reason, "message": "registry.example/cityseg-ops:1a2b3c"}

    def controller() -> None:
        stub.wait_for(lambda: stub.get(JOBS, name))
        pod = f"{name}-0-x1"
        stub.add_pod(NS, pod, _pod_labels(name), phase="Pending")
        statuses = [{"name": "trainer", "ready": False, "restartCount": 0, "image": "i", "imageID": "",
                     "state": {"waiting": waiting}}]  # fmt: skip
        stub.update(PODS, pod, lambda p: p["status"].update(containerStatuses=statuses))

    thread = _controller(controller)
    with pytest.raises(
        TrainingError, match=rf"pod 0 cannot start \({reason}: registry.example.*multinode.image"
    ):
        _run(stub, _overrides())
    thread.join(5)
    assert not thread.errors
    assert stub.get(JOBS, name) is None and stub.get(SERVICES, name) is None  # deleted on the way out


def test_missing_rbac_is_named(stub, job_env):
    stub.refuse[("POST", "jobs")] = 403
    with pytest.raises(TrainingError, match=r"HTTP 403.*forbidden.*components.cluster --rbac"):
        _run(stub, _overrides())


def test_the_trainjob_engine_runs_through_the_custom_objects_api(stub, job_env, caplog):
    caplog.set_level(logging.INFO, logger="components.cluster")
    name = job_name(RUN_NAME, OUTPUT, 2)

    def controller() -> None:
        trainjob = stub.wait_for(lambda: stub.get(TRAINJOBS, name))
        pod = f"{name}-node-0-0-abcde"
        labels = {"jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/replicatedjob-name": "node"}
        stub.add_pod(NS, pod, {**labels, "batch.kubernetes.io/job-completion-index": "0"})
        stub.log(pod, "[rank 0] epoch 1/1")
        _rank0_succeeds(stub, pod)
        stub.update(
            TRAINJOBS,
            name,
            lambda t: t.update(status={"conditions": [{"type": "Complete", "status": "True"}]}),
        )
        assert trainjob["spec"]["trainer"]["numNodes"] == 2

    thread = _controller(controller)
    trainjob = ["orchestration.multinode.engine=trainjob", "orchestration.multinode.data_claim=null"]
    s3_data = ["data.source=s3", "data.uri=s3://datasets/cityscapes"]
    assert _run(stub, _overrides(*trainjob, *s3_data)) == _result()
    thread.join(5)
    assert not thread.errors
    assert _pod0_lines(caplog) == ["[rank 0] epoch 1/1"]
    assert [p for _, p in stub.calls("POST")] == [TRAINJOBS]
    assert stub.get(TRAINJOBS, name) is None
    _assert_the_role_allows_every_call(stub, "trainjob")


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"overrides": ["orchestration.multinode.image=null"]}, "orchestration.multinode.image"),
        ({"env": {"MLFLOW_TRACKING_URI": ""}}, "MLFLOW_TRACKING_URI"),
        ({"recipe": "my-recipe.yaml"}, "recipe file"),
    ],
)
def test_jobs_the_pods_could_not_run_are_refused_before_submitting(monkeypatch, tmp_path, change, named):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    for key, value in change.get("env", {}).items():
        monkeypatch.setenv(key, value)
    """The rules (tests/test_cluster_rules.py) apply to the run, with this process's environment, before
    any API call (``api`` is no client)."""
    overrides = [*_overrides(), f"run_dir={tmp_path}", *change.get("overrides", [])]
    with pytest.raises(ConfigError, match=named.replace(" ", ".*")):
        train_on_cluster(change.get("recipe", "strong"), overrides, run_name=RUN_NAME, api=object())


# --- the train stage in a Prefect flow run ------------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_server() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.slow
def test_the_train_stage_submits_the_job_and_its_flow_run_logs_pod0s_lines(
    prefect_server, stub, job_env, monkeypatch, tmp_path
):
    """flows/stages.py's train stage with multinode.enabled, as the finetune flow runs it: the kube config
    (pointing at the stub) found outside a pod, the flow's local output_dir moved to s3_run_dir, the labels
    from the flow run, pod 0's lines in the flow run's logs on the Prefect server (no logging settings
    needed: the flow sets them) and its progress records in the flow run's artifacts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    from flows.stages import train_stage

    kube_config = tmp_path / "kubeconfig"
    kube_config.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: stub\n"
        f"clusters: [{{name: stub, cluster: {{server: '{stub.api.configuration.host}'}}}}]\n"
        "users: [{name: u, user: {}}]\ncontexts: [{name: stub, context: {cluster: stub, user: u}}]\n"
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr("kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", str(kube_config))
    monkeypatch.setattr(runner, "POLL_S", 0.2)
    output = f"s3://cityseg/runs/flow-runs/{tmp_path.name}/train"

    def controller() -> None:
        (name,) = stub.wait_for(lambda: [name for where, name in stub.objects if where == JOBS])
        pod = f"{name}-0-abcde"
        stub.add_pod(NS, pod, _pod_labels(name))
        record = EpochProgress(1, 1, train_loss=0.9, lr=0.0, images_per_second=80.0, val_miou=0.5, eta_s=0.0)
        stub.log(pod, "[rank 0] epoch 1/1 loss 0.9 - from the training pod", f"[rank 0] {record.to_line()}")
        result = TrainResult(f"{output}/best.pt", f"{output}/epoch_0001.pt", 0.5, "run-1", 1)
        storage.write_bytes(f"{output}/train_result.json", json.dumps(asdict(result)).encode())
        stub.end_container(NS, pod, "Succeeded")
        _finish(stub, name)

    thread = _controller(controller)
    overrides = [
        f"run_dir={tmp_path / 'runs'}",
        f"train.output_dir={tmp_path / 'runs' / 'flow-runs' / tmp_path.name / 'train'}",
        "orchestration.multinode.enabled=true",
        "orchestration.multinode.image=registry.example/cityseg-ops:1a2b3c",
        "orchestration.multinode.s3_run_dir=s3://cityseg/runs",
    ]
    state = train_stage(recipe="strong", overrides=overrides, return_state=True)
    thread.join(5)
    assert not thread.errors
    assert state.is_completed(), state
    assert state.result()["best_checkpoint"] == f"{output}/best.pt"
    job = next(body for body in stub.created if body["kind"] == "Job")
    flow_run_id = str(state.state_details.flow_run_id)
    assert job["metadata"]["labels"]["cityseg-ops/flow-run-id"] == flow_run_id
    assert f"train.output_dir={output}" in job["spec"]["template"]["spec"]["containers"][0]["command"]

    APILogWorker.drain_all(timeout=30)  # what Prefect does at the end of a flow-run process
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        artifacts = client.read_artifacts()
    messages = [log.message for log in logs]
    assert "[rank 0] epoch 1/1 loss 0.9 - from the training pod" in messages, messages
    assert not [message for message in messages if "cityseg-progress" in message]
    ours = {a.key: a for a in artifacts if str(a.flow_run_id) == flow_run_id}
    assert float(ours["training-progress"].data) == 100.0
    (row,) = json.loads(ours["training-epoch"].data)
    assert row == {
        "epoch": "1/1",
        "train loss": 0.9,
        "lr": 0.0,
        "images/s": 80.0,
        "val mIoU (%)": 50.0,
        "ETA": "0:00:00",
    }
