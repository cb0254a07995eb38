"""Run one multi-node training job on Kubernetes from the orchestrator's process and return its result.

    result = run_training_job(cfg, recipe="strong", overrides=[...], run_name="strong-resnet50-train")

The Kubernetes counterpart of ``components.launch.launch_training``: it renders the job from the config
(``components.multinode.training_manifests``: an Indexed Job + headless Service, or a Kubeflow TrainJob),
submits it, follows it to its end while relaying pod 0's log line by line to this module's logger (a
replacement pod 0 is picked up; rank 0's progress records go to the caller's ``on_epoch``, as in
``launch_training``), then reads ``<train.output_dir>/train_result.json`` (``s3://``) and
returns the ``TrainResult``. A failed job raises ``TrainingError`` naming the job, the reason Kubernetes
gives and pod 0's last lines. Pod 0 carries global rank 0: torchrun's c10d rendezvous numbers the agents
by host name, and pod 0's (``<job>-0.<job>...``) sorts first.

The job (and its Service) is deleted when it ends, when it fails and when the caller stops (an exception,
KeyboardInterrupt, SIGTERM: Prefect's engine turns a cancelled flow run's SIGTERM into an exception, and
outside Prefect this module does). A job left behind by a killed caller is stopped by
``activeDeadlineSeconds`` and deleted ``ttlSecondsAfterFinished`` after it ends; a rerun with the same
name replaces it. The name comes from the run's name plus a digest of ``train.output_dir``: a rerun (a
retry of the flow run) gets the same job name and resumes from the same checkpoints.

Cluster access: the pod's service account when this runs in a pod, else ``$KUBECONFIG`` or
``~/.kube/config``. The Role the account needs: ``python -m components.multinode --rbac``.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import queue
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from components.config import Config
from components.errors import ConfigError
from components.launch import OnEpoch, relay_progress
from components.multinode import (
    TRAINJOB_GROUP,
    TRAINJOB_PLURAL,
    TRAINJOB_VERSION,
    training_manifests,
)
from components.train_contract import TrainingError, TrainingInterrupted, TrainResult, read_result

logger = logging.getLogger(__name__)

FORWARDED_VARIABLES = (
    "MLFLOW_TRACKING_URI",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
)
"""Plain settings of this process that the pods receive as ``env`` values (never credentials)."""
LABEL_PREFIX = "cityseg-ops/"
"""Prefix of the run labels. Not ``prefect.io/``: Prefect's Kubernetes observer reads those labels and
would report a failed training pod (which torchrun's agents survive) as a crash of the flow run."""
POLL_S = 10.0
"""Seconds between reads of the job's status (and retries of pod 0's log)."""
REQUEST_TIMEOUT_S = 30
"""Limit of every API call except the log stream."""
API_RETRY_S = 300.0
"""How long an unreachable or overloaded API server is retried before the run fails."""
IMAGE_PULL_GRACE_S = 600.0
"""How long pod 0 may keep failing to pull its image (ErrImagePull, ImagePullBackOff: a registry outage
heals) before the run fails; an image that can never start (InvalidImageName) fails it at once. Without
this a wrong tag would wait out activeDeadlineSeconds (24 h by default)."""
_PULL_RETRYING = frozenset({"ErrImagePull", "ImagePullBackOff"})
_NEVER_STARTS = frozenset({"InvalidImageName", "ErrImageNeverPull"})
DELETE_WAIT_S = 300.0
"""Longest wait for a leftover job's pods to go before its replacement is created."""
_DNS_UNSAFE = re.compile(r"[^a-z0-9]+")
_LABEL_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


# --- names and labels -------------------------------------------------------------------------------


def job_name(run_name: str, output_dir: str, nodes: int) -> str:
    """``<run name>-<digest of output_dir>``: a DNS label that starts with a letter, short enough that the
    pod host names ``<name>-<index>`` fit in 63 characters; the same run and output_dir, the same name."""
    digest = hashlib.sha256(output_dir.encode()).hexdigest()[:8]
    room = 63 - len(f"-{nodes - 1}") - len(f"-{digest}")
    slug = _DNS_UNSAFE.sub("-", run_name.lower()).strip("-")
    if not slug[:1].isalpha():
        slug = f"train-{slug}"
    return f"{slug[:room].rstrip('-')}-{digest}"


def label_value(text: str) -> str:
    """``text`` as a valid label value: at most 63 of ``[A-Za-z0-9._-]``, alphanumeric at both ends; a
    shortened value ends with a digest of the whole text, so distinct texts stay distinct."""
    value = _LABEL_UNSAFE.sub("-", text).strip("-._")
    if len(value) > 63:
        value = f"{value[:54].rstrip('-._')}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    return value


def run_labels(
    flow_run_id: str | None, flow_run_name: str | None, root_flow_run_id: str | None = None
) -> dict[str, str]:
    """Labels naming the flow run a job belongs to (``kubectl get jobs -l cityseg-ops/flow-run-id=...``)."""
    values = {
        "flow-run-id": flow_run_id,
        "flow-run-name": flow_run_name,
        "root-flow-run-id": root_flow_run_id,
    }
    return {f"{LABEL_PREFIX}{key}": label_value(str(value)) for key, value in values.items() if value}


def forwarded_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The pods' plain environment: this process's endpoints (FORWARDED_VARIABLES) and a progress-bar
    interval for piped logs. A URL with credentials in it is refused: those belong in the Secret."""
    environ = os.environ if environ is None else environ
    env = {name: environ[name] for name in FORWARDED_VARIABLES if environ.get(name)}
    for name, value in env.items():
        if "@" in urlsplit(value).netloc:
            raise ConfigError(
                f"{name} carries credentials in its URL, which a manifest must not: put them in the "
                "credentials Secret (MLFLOW_TRACKING_USERNAME/PASSWORD, AWS_ACCESS_KEY_ID/SECRET_ACCESS_KEY)"
            )
    env["TQDM_MININTERVAL"] = environ.get("TQDM_MININTERVAL", "30")
    return env


# --- job and pod state (from kubernetes.client models, or a TrainJob's dict) ------------------------


@dataclass(frozen=True)
class JobState:
    finished: bool
    succeeded: bool
    reason: str | None = None
    message: str | None = None
    summary: str = ""
    """Pod counts (Indexed Job) or condition names (TrainJob), logged when they change."""


def job_state(job: Any) -> JobState:
    """The state of a ``V1Job`` or a TrainJob (a dict): finished once a ``Complete`` or ``Failed``
    condition is true. Kubernetes >= 1.31 sets those only when every pod has terminated."""
    if isinstance(job, Mapping):
        status = job.get("status") or {}
        conditions = [
            (c.get("type"), c.get("status"), c.get("reason"), c.get("message"))
            for c in status.get("conditions") or []
        ]
        summary = ", ".join(kind for kind, value, *_ in conditions if value == "True") or "submitted"
    else:
        status = job.status
        conditions = [(c.type, c.status, c.reason, c.message) for c in (status and status.conditions) or []]
        counts = {
            name: (getattr(status, name, None) or 0) if status else 0
            for name in ("active", "ready", "succeeded", "failed")
        }
        summary = ", ".join(f"{count} {name}" for name, count in counts.items())
    for kind, value, reason, message in conditions:
        if value == "True" and kind in ("Complete", "Failed"):
            return JobState(True, kind == "Complete", reason, message, summary)
    return JobState(False, False, summary=summary)


def pod_waiting_reason(pod: Any) -> str | None:
    """Why a pod has not started its container yet (unschedulable, pulling the image...), or None."""
    status = pod.status
    if status is None or status.phase != "Pending":
        return None
    for condition in status.conditions or []:
        if condition.type == "PodScheduled" and condition.status == "False":
            return f"not scheduled: {condition.reason}: {condition.message}"
    for container in status.container_statuses or []:
        waiting = container.state and container.state.waiting
        if waiting:
            return f"{waiting.reason}" + (f": {waiting.message}" if waiting.message else "")
    return "pending"


# --- the API calls ----------------------------------------------------------------------------------


def api_client() -> Any:
    """A ``kubernetes.client.ApiClient``: the pod's service account in a pod, else the kube config."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException as in_cluster:
        try:
            config.load_kube_config(client_configuration=configuration)
        except (config.ConfigException, OSError) as kube_config:
            raise ConfigError(
                "no Kubernetes cluster to run the training job on: not in a pod with a service account "
                f"({in_cluster}) and no usable kube config at $KUBECONFIG or ~/.kube/config ({kube_config})"
            ) from None
    return client.ApiClient(configuration)


class KubeJobs:
    """The API calls of a training job's life in one namespace, for one engine (``kubernetes.client``)."""

    def __init__(self, api: Any, namespace: str, engine: str) -> None:
        from kubernetes import client

        self.namespace, self.engine = namespace, engine
        self.core, self.batch = client.CoreV1Api(api), client.BatchV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.container = "node" if engine == "trainjob" else "trainer"

    def create(self, manifests: list[dict[str, Any]]) -> None:
        """The job, then (Indexed Job) its Service, owned by the job: deleting the job, or its TTL
        running out, deletes the Service too."""
        from kubernetes import client

        if self.engine == "trainjob":
            (train_job,) = manifests
            self.custom.create_namespaced_custom_object(
                TRAINJOB_GROUP, TRAINJOB_VERSION, self.namespace, TRAINJOB_PLURAL, train_job,
                _request_timeout=REQUEST_TIMEOUT_S,
            )  # fmt: skip
            return
        service, job = manifests
        created = self.batch.create_namespaced_job(
            self.namespace, client.V1Job.from_dict(job), _request_timeout=REQUEST_TIMEOUT_S
        )
        owner = {"apiVersion": "batch/v1", "kind": "Job", "name": created.metadata.name}
        owner["uid"] = created.metadata.uid
        service = {**service, "metadata": {**service["metadata"], "ownerReferences": [owner]}}
        self.core.create_namespaced_service(
            self.namespace, client.V1Service.from_dict(service), _request_timeout=REQUEST_TIMEOUT_S
        )

    def read(self, name: str) -> Any | None:
        """The job (a ``V1Job``, or a TrainJob's dict), None if it does not exist."""
        if self.engine == "trainjob":
            return _unless_missing(
                self.custom.get_namespaced_custom_object,
                TRAINJOB_GROUP, TRAINJOB_VERSION, self.namespace, TRAINJOB_PLURAL, name,
                _request_timeout=REQUEST_TIMEOUT_S,
            )  # fmt: skip
        return _unless_missing(
            self.batch.read_namespaced_job, name, self.namespace, _request_timeout=REQUEST_TIMEOUT_S
        )

    def delete(self, name: str, *, foreground: bool = False) -> None:
        """Delete the job (and its Service); missing ones are fine. Background: return at once, the
        garbage collector removes the pods; foreground: the job stays until its pods are gone."""
        policy = "Foreground" if foreground else "Background"
        timeout = REQUEST_TIMEOUT_S
        if self.engine == "trainjob":
            _unless_missing(
                self.custom.delete_namespaced_custom_object,
                TRAINJOB_GROUP, TRAINJOB_VERSION, self.namespace, TRAINJOB_PLURAL, name,
                propagation_policy=policy, _request_timeout=timeout,
            )  # fmt: skip
            return
        _unless_missing(
            self.batch.delete_namespaced_job,
            name, self.namespace, propagation_policy=policy, _request_timeout=timeout,
        )  # fmt: skip
        _unless_missing(self.core.delete_namespaced_service, name, self.namespace, _request_timeout=timeout)

    def gone(self, name: str) -> bool:
        if self.read(name) is not None:
            return False
        if self.engine == "trainjob":
            return True
        read_service = self.core.read_namespaced_service
        return _unless_missing(read_service, name, self.namespace, _request_timeout=REQUEST_TIMEOUT_S) is None

    def rank0_pods(self, name: str) -> list[Any]:
        """Pods of node 0 (``V1Pod``), a replaced one and its replacement alike."""
        if self.engine == "trainjob":
            selector = (
                f"jobset.sigs.k8s.io/jobset-name={name},jobset.sigs.k8s.io/replicatedjob-name=node,"
                "batch.kubernetes.io/job-completion-index=0"
            )
        else:
            selector = f"batch.kubernetes.io/job-name={name},batch.kubernetes.io/job-completion-index=0"
        return self.core.list_namespaced_pod(
            self.namespace, label_selector=selector, _request_timeout=REQUEST_TIMEOUT_S
        ).items

    def read_pod(self, pod_name: str) -> Any | None:
        return _unless_missing(
            self.core.read_namespaced_pod, pod_name, self.namespace, _request_timeout=REQUEST_TIMEOUT_S
        )

    def open_log(self, pod_name: str) -> Any:
        """The pod's log as a streaming ``urllib3`` response; it ends when the container does."""
        return self.core.read_namespaced_pod_log(
            pod_name, self.namespace, container=self.container, follow=True, _preload_content=False
        )


def _unless_missing(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any | None:
    from kubernetes.client import ApiException

    try:
        return call(*args, **kwargs)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _retrying(call: Callable[[], Any], what: str, retry_s: float = API_RETRY_S) -> Any:
    """``call()``, again after transient API failures (connection, 429, 5xx) for up to ``retry_s``."""
    from kubernetes.client import ApiException
    from urllib3.exceptions import HTTPError

    deadline, delay = time.monotonic() + retry_s, 1.0
    while True:
        try:
            return call()
        except ApiException as exc:
            if exc.status not in (0, 429, 500, 502, 503, 504) or time.monotonic() > deadline:
                raise _api_error(exc, what) from None
            problem: Exception = exc
        except HTTPError as exc:
            if time.monotonic() > deadline:
                raise TrainingError(f"Kubernetes API unreachable while {what}: {exc}") from None
            problem = exc
        logger.warning("Kubernetes API failed while %s (%s); retrying in %.0f s", what, problem, delay)
        time.sleep(delay)
        delay = min(2 * delay, 30.0)


def _api_error(exc: Any, what: str) -> TrainingError:
    reason = getattr(exc, "reason", None) or exc
    with contextlib.suppress(TypeError, ValueError, AttributeError):
        reason = json.loads(exc.body).get("message", reason)
    hint = (
        "; the flow pod's service account needs the Role of `python -m components.multinode --rbac`"
        if exc.status == 403
        else ""
    )
    return TrainingError(f"Kubernetes API refused {what} (HTTP {exc.status}): {reason}{hint}")


# --- following pod 0's log ----------------------------------------------------------------------------


class _Rank0Log(threading.Thread):
    """Relays pod 0's log lines (and why it is still pending) into a queue the caller's thread logs
    from: log records need the caller's context (Prefect sends a flow run's logs from its own thread).
    A replacement pod 0 is followed next; a re-opened stream of the same pod skips what was relayed."""

    def __init__(self, jobs: KubeJobs, name: str, lines: queue.Queue[str], interval_s: float) -> None:
        super().__init__(name=f"log-{name}", daemon=True)
        self.jobs, self.job, self.lines, self.interval_s = jobs, name, lines, interval_s
        self.job_ended = threading.Event()
        """Set by the caller: return once the current pod's log is drained."""
        self.cannot_start: str | None = None
        """Why pod 0 will not start (its image), for the caller to fail the run with."""
        self._pull_failing_since: float | None = None
        self._stop_now = threading.Event()
        self._response: Any = None
        self._lock = threading.Lock()

    def stop(self) -> None:
        self._stop_now.set()
        with self._lock:
            if self._response is not None:
                with contextlib.suppress(Exception):
                    self._response.shutdown()  # unblocks a read in progress (urllib3 >= 2.3)

    def run(self) -> None:
        relayed: collections.Counter[str] = collections.Counter()  # pod uid -> lines relayed
        drained: set[str] = set()
        last_note = None
        while not self._stop_now.is_set():
            try:
                pod = self._current_pod(drained)
                if pod is None:
                    if self.job_ended.is_set():
                        return
                else:
                    note = pod_waiting_reason(pod)
                    if note is None:
                        self._relay(pod, relayed)
                        if self._terminated(pod):
                            drained.add(pod.metadata.uid)
                            continue
                    elif note != last_note:
                        self.lines.put(f"[pod {pod.metadata.name}] {note}")
                        last_note = note
                    self._check_image(note)
            except Exception as exc:  # the API, the stream: try again; the caller decides about the job
                logger.debug("following %s's pod 0: %s", self.job, exc)
            self._stop_now.wait(self.interval_s)

    def _check_image(self, note: str | None) -> None:
        reason = (note or "").partition(":")[0]
        if reason not in _PULL_RETRYING:
            self._pull_failing_since = None
        elif self._pull_failing_since is None:
            self._pull_failing_since = time.monotonic()
        failing_s = time.monotonic() - (self._pull_failing_since or time.monotonic())
        if reason in _NEVER_STARTS or failing_s > IMAGE_PULL_GRACE_S:
            self.cannot_start = note

    def _current_pod(self, drained: set[str]) -> Any | None:
        pods = [pod for pod in self.jobs.rank0_pods(self.job) if pod.metadata.uid not in drained]

        def newest_running(pod: Any) -> tuple[Any, bool]:
            ended = pod.status is not None and pod.status.phase in ("Succeeded", "Failed")
            return pod.metadata.creation_timestamp, not ended

        return max(pods, key=newest_running, default=None)

    def _relay(self, pod: Any, relayed: collections.Counter[str]) -> None:
        from kubernetes.watch.watch import iter_resp_lines

        uid, seen = pod.metadata.uid, 0
        response = self.jobs.open_log(pod.metadata.name)
        with self._lock:
            self._response = response
        try:
            if self._stop_now.is_set():  # stop() came before there was a response to shut
                return
            for line in iter_resp_lines(response):
                if self._stop_now.is_set():
                    return
                seen += 1
                if seen > relayed[uid]:
                    relayed[uid] = seen
                    if line.strip():  # what a closing progress bar leaves behind
                        self.lines.put(line.rstrip())
        finally:
            with self._lock:
                self._response = None
            with contextlib.suppress(Exception):
                response.release_conn()

    def _terminated(self, pod: Any) -> bool:
        current = self.jobs.read_pod(pod.metadata.name)
        return (
            current is None
            or current.metadata.uid != pod.metadata.uid
            or (current.status is not None and current.status.phase in ("Succeeded", "Failed"))
        )


# --- the run --------------------------------------------------------------------------------------


def render_job(
    cfg: Config,
    *,
    recipe: str,
    overrides: list[str],
    run_name: str,
    labels: Mapping[str, str] | None = None,
    image: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[str, list[dict[str, Any]]]:
    """The job's name and manifests as ``run_training_job`` submits them, after checking that its pods
    can run it. ``recipe`` + ``overrides`` (from which ``cfg`` was loaded) are what the pods receive;
    ``run_name`` (the flow run's) names the job; ``labels`` are added (values made valid); ``image``
    defaults to ``orchestration.multinode.image``; ``environ`` (default: this process's) gives the pods'
    plain settings (``forwarded_env``)."""
    environ = os.environ if environ is None else environ
    settings = cfg.orchestration.multinode
    image = image or settings.image
    if not image or "{{" in image:
        raise ConfigError(
            f"orchestration.multinode.image={image!r}: name the project image the pods run (the Kubernetes "
            "deployment takes it from CITYSEG_IMAGE where `prefect deploy` runs)"
        )
    if Path(recipe).suffix in (".yaml", ".yml"):
        raise ConfigError(
            f"recipe {recipe!r} is a file the job's pods cannot read: use a recipe name plus overrides"
        )
    tracking_uri = cfg.tracking.tracking_uri or environ.get("MLFLOW_TRACKING_URI") or ""
    if urlsplit(tracking_uri).scheme in ("", "file", "sqlite"):
        raise ConfigError(
            f"the MLflow store {tracking_uri or cfg.resolved_tracking_uri()!r} is local to this machine, the "
            "job's pods cannot log to it: set MLFLOW_TRACKING_URI (or tracking.tracking_uri) to a server"
        )
    name = job_name(run_name, cfg.train.output_dir, settings.nodes)
    manifests = training_manifests(
        cfg,
        image=image,
        job_name=name,
        recipe=recipe,
        overrides=overrides,
        labels={key: label_value(value) for key, value in (labels or {}).items()},
        env=forwarded_env(environ),
    )
    return name, manifests


def run_training_job(
    cfg: Config,
    *,
    recipe: str,
    overrides: list[str],
    run_name: str,
    labels: Mapping[str, str] | None = None,
    image: str | None = None,
    api: Any = None,
    poll_s: float | None = None,
    on_epoch: OnEpoch | None = None,
) -> TrainResult:
    """Submit ``cfg``'s multi-node training job, follow it to its end and return its TrainResult.

    ``recipe``, ``overrides``, ``run_name``, ``labels``, ``image``: as for ``render_job``; ``api``: a
    ``kubernetes.client.ApiClient`` (default ``api_client()``); ``poll_s``: default ``POLL_S``;
    ``on_epoch``: receives rank 0's progress records, in this thread.
    """
    poll_s = poll_s or POLL_S
    settings = cfg.orchestration.multinode
    name, manifests = render_job(
        cfg, recipe=recipe, overrides=overrides, run_name=run_name, labels=labels, image=image
    )
    image = image or settings.image
    jobs = KubeJobs(api if api is not None else api_client(), settings.namespace, settings.engine)
    where = f"{settings.namespace}/{name}"
    tail: collections.deque[str] = collections.deque(maxlen=30)
    with _sigterm_raises(where):
        try:
            _remove_leftover(jobs, name, poll_s)
            _retrying(lambda: jobs.create(manifests), f"creating job {where}", retry_s=0)
            logger.info(
                "training job %s (%s): %d node(s) x %d GPU(s), image %s, checkpoints in %s",
                where, settings.engine, settings.nodes, settings.gpus_per_node, image, cfg.train.output_dir,
            )  # fmt: skip
            state = _follow(jobs, name, where, poll_s, tail, on_epoch)
        finally:
            _delete_quietly(jobs, name, where)
    if not state.succeeded:
        raise TrainingError(
            f"training job {where} failed ({state.reason}: {state.message}); rerunning with the same "
            f"train.output_dir={cfg.train.output_dir} resumes from its last checkpoint.\n"
            "Last output of pod 0:\n" + "\n".join(tail)
        )
    return read_result(cfg.train.output_dir, where)


def _remove_leftover(jobs: KubeJobs, name: str, poll_s: float) -> None:
    """A job of the same name (a killed earlier attempt) goes first, with its pods: they hold pod 0's
    host name and the rendezvous port."""
    where = f"{jobs.namespace}/{name}"
    existing = _retrying(lambda: jobs.read(name), f"reading job {where}")
    if existing is not None:
        state = job_state(existing)
        logger.warning(
            "replacing the earlier job %s (%s); the new one resumes from the checkpoints",
            where, "ended" if state.finished else f"still running: {state.summary}",
        )  # fmt: skip
    _retrying(lambda: jobs.delete(name, foreground=True), f"deleting job {where}")
    deadline = time.monotonic() + DELETE_WAIT_S
    while not _retrying(lambda: jobs.gone(name), f"reading job {where}"):
        if time.monotonic() > deadline:
            raise TrainingError(f"the earlier job {where} is still being deleted after {DELETE_WAIT_S:.0f} s")
        time.sleep(poll_s)


def _follow(
    jobs: KubeJobs,
    name: str,
    where: str,
    poll_s: float,
    tail: collections.deque[str],
    on_epoch: OnEpoch | None,
) -> JobState:
    """Poll the job until it finishes, logging pod 0's lines as they come."""
    lines: queue.Queue[str] = queue.Queue()
    follower = _Rank0Log(jobs, name, lines, poll_s)
    follower.start()
    last_summary = None
    try:
        while True:
            job = _retrying(lambda: jobs.read(name), f"reading job {where}")
            if job is None:
                raise TrainingError(f"training job {where} disappeared before it ended (deleted by someone?)")
            state = job_state(job)
            if state.summary != last_summary:
                logger.info("job %s: %s", where, state.summary)
                last_summary = state.summary
            if state.finished:
                break
            _log_lines(lines, tail, on_epoch, wait_s=poll_s)
            if follower.cannot_start:
                raise TrainingError(
                    f"training job {where}: pod 0 cannot start ({follower.cannot_start}); check "
                    "orchestration.multinode.image and that the nodes can pull it"
                )
        follower.job_ended.set()  # pod 0's last lines may still be on their way
        deadline = time.monotonic() + max(30.0, 3 * poll_s)
        while follower.is_alive() and time.monotonic() < deadline:
            _log_lines(lines, tail, on_epoch, wait_s=min(poll_s, 0.5))
    finally:
        follower.stop()
        follower.join(timeout=5)
        _log_lines(lines, tail, on_epoch, wait_s=0)
    return state


def _log_lines(
    lines: queue.Queue[str], tail: collections.deque[str], on_epoch: OnEpoch | None, wait_s: float
) -> None:
    """Log what the follower queued (progress records to ``on_epoch``), waiting up to ``wait_s`` for the
    first line."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic())) if wait_s else lines.get_nowait()
        except queue.Empty:
            return
        wait_s = 0  # then only what is already there
        if relay_progress(line, on_epoch):
            continue
        tail.append(line)
        logger.info("%s", line)


def _delete_quietly(jobs: KubeJobs, name: str, where: str) -> None:
    try:
        jobs.delete(name)
        logger.info("deleted job %s", where)
    except Exception as exc:  # never hide why the run ended; the job's TTL removes it
        logger.warning("could not delete job %s (%s); ttlSecondsAfterFinished removes it later", where, exc)


@contextlib.contextmanager
def _sigterm_raises(where: str) -> Iterator[None]:
    """SIGTERM raises TrainingInterrupted here, so the job is deleted on the way out, where no one else
    (Prefect's engine) has made it an exception already. A second SIGTERM does not stop the clean-up."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def interrupt(_signum: int, _frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise TrainingInterrupted(
            f"SIGTERM: stopping the training job {where}; a rerun resumes from its last checkpoint"
        )

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
