"""Talking to the Kubernetes API: the cluster connection, the calls of a training job's life in one
namespace (``KubeJobs``), and retries of transient failures (``retrying``).

Cluster access: the pod's service account when this runs in a pod, else ``$KUBECONFIG`` or
``~/.kube/config``. The Role the account needs: ``python -m components.cluster --rbac``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from components.cluster.manifests import TRAINJOB_GROUP, TRAINJOB_PLURAL, TRAINJOB_VERSION
from components.errors import ConfigError
from components.train_contract import TrainingError

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 30
"""Limit of every API call except the log stream."""
API_RETRY_S = 300.0
"""How long an unreachable or overloaded API server is retried before the run fails."""


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


def retrying(call: Callable[[], Any], what: str, retry_s: float = API_RETRY_S) -> Any:
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
        "; the flow pod's service account needs the Role of `python -m components.cluster --rbac`"
        if exc.status == 403
        else ""
    )
    return TrainingError(f"Kubernetes API refused {what} (HTTP {exc.status}): {reason}{hint}")
