"""Reading where a training job and its pods stand, from ``kubernetes.client`` models (or a TrainJob's
dict): finished or not, succeeded or not, and why a pod has not started."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


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


def pod_ended(pod: Any) -> bool:
    """The pod's containers have terminated (for good: the pods' restartPolicy is Never)."""
    return pod.status is not None and pod.status.phase in ("Succeeded", "Failed")
