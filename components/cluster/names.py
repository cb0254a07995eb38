"""Names and labels of a training job's Kubernetes objects.

The job's name is a DNS label derived from the run's name and its ``train.output_dir`` (a rerun gets the
same job and resumes from the same checkpoints); label values are made valid; the run labels name the
flow run a job belongs to.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

LABEL_PREFIX = "cityseg-ops/"
"""Prefix of the run labels. Not ``prefect.io/``: Prefect's Kubernetes observer reads those labels and
would report a failed training pod (which torchrun's agents survive) as a crash of the flow run."""
APP_LABELS = {"app.kubernetes.io/name": "cityseg-ops", "app.kubernetes.io/component": "training"}
LAUNCHER_ROLE = "cityseg-training-launcher"
"""Role (``python -m components.cluster --rbac``) that lets the flow's pod submit, follow and delete
training jobs in its namespace."""
_DNS_UNSAFE = re.compile(r"[^a-z0-9]+")
_LABEL_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


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


def job_labels(name: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The labels of a job's objects and pods: the app's, the job's own (the Service's selector) and
    ``extra`` (values made valid)."""
    labels = {**APP_LABELS, f"{LABEL_PREFIX}job": name}
    return labels | {key: label_value(value) for key, value in (extra or {}).items()}
