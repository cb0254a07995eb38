"""The rules of a multi-node job (components/cluster/rules.py) and its names (components/cluster/names.py):
every unsafe job is refused before anything is rendered or submitted, with the field named; a local output
dir under run_dir moves to s3_run_dir; job names are DNS labels, label values valid."""

from __future__ import annotations

import re

import pytest

from components.cluster.names import job_name, label_value, run_labels
from components.cluster.rules import validate_job
from components.config import load_config
from components.errors import ConfigError

OUTPUT = "s3://cityseg/runs/flow-runs/0b9e/train"
S3_OUT = f"train.output_dir={OUTPUT}"
RUN_NAME = "strong-resnet50-train"
IMAGE = "registry.example/cityseg-ops:1a2b3c"
TRACKING = {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _validate(overrides: list[str], **kwargs):
    return validate_job(
        "strong", overrides, **{"run_name": RUN_NAME, "image": IMAGE, "environ": TRACKING, **kwargs}
    )


# --- the rules ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "job", "named"),
    [
        (["train.output_dir=/local/runs"], "finetune-abc", "train.output_dir"),
        ([S3_OUT, "orchestration.multinode.data_claim=null"], "finetune-abc", "data.source=s3"),
        ([S3_OUT, "orchestration.multinode.engine=trainjob"], "finetune-abc", "data_claim='cityseg-data'"),
        ([S3_OUT, "data.root=/mnt/cityscapes"], "finetune-abc", "data.root"),
        ([S3_OUT], "Finetune_ABC", "DNS label"),
        ([S3_OUT], "f" * 62, "63 characters"),
    ],
)
def test_unsafe_jobs_are_refused_with_the_field_named(overrides, job, named):
    with pytest.raises(ConfigError, match=named):
        _validate(overrides, job_name=job)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (
            {"overrides": ["orchestration.multinode.image=null"], "image": None},
            "orchestration.multinode.image",
        ),
        ({"image": "{{ $CITYSEG_IMAGE }}"}, "orchestration.multinode.image"),
        ({"environ": {}}, "MLFLOW_TRACKING_URI"),
        ({"environ": {"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"}}, "MLFLOW_TRACKING_URI"),
        ({"recipe": "my-recipe.yaml"}, "recipe file"),
    ],
)
def test_jobs_the_pods_could_not_run_are_refused(tmp_path, change, named):
    overrides = [S3_OUT, f"run_dir={tmp_path}", *change.get("overrides", [])]
    with pytest.raises(ConfigError, match=named.replace(" ", ".*")):
        validate_job(
            change.get("recipe", "strong"),
            overrides,
            run_name=RUN_NAME,
            image=change.get("image", IMAGE),
            environ=change.get("environ", TRACKING),
        )


def test_the_image_comes_from_the_config_unless_given():
    overrides = [S3_OUT, "orchestration.multinode.image=registry.example/cityseg-ops:cfg"]
    assert _validate(overrides, image=None).image == "registry.example/cityseg-ops:cfg"
    assert _validate(overrides).image == IMAGE


def test_a_local_output_dir_under_run_dir_moves_to_s3_run_dir():
    overrides = [
        "orchestration.multinode.s3_run_dir=s3://cityseg/runs",
        "train.output_dir=runs/flow-runs/ab/train",
    ]
    job = _validate(overrides)
    assert job.overrides == [*overrides, "train.output_dir=s3://cityseg/runs/flow-runs/ab/train"]
    assert job.cfg.train.output_dir == "s3://cityseg/runs/flow-runs/ab/train"
    assert job.name == job_name(RUN_NAME, job.cfg.train.output_dir, 2)  # named after where it resumes from
    pinned = [*overrides, S3_OUT]
    assert _validate(pinned).overrides == pinned


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.output_dir=runs/x"],
        ["orchestration.multinode.s3_run_dir=s3://b/runs", "train.output_dir=/elsewhere/x"],
    ],
)
def test_a_local_output_dir_without_an_s3_home_is_refused(overrides):
    with pytest.raises(ConfigError, match=r"train\.output_dir=.*s3_run_dir"):
        _validate(overrides)


def test_s3_run_dir_must_be_s3():
    with pytest.raises(ConfigError, match="s3_run_dir"):
        load_config("strong", ["orchestration.multinode.s3_run_dir=/mnt/runs"])


def test_node_range_is_checked_by_the_config():
    with pytest.raises(ConfigError, match="min_nodes"):
        load_config("strong", ["orchestration.multinode.nodes=2", "orchestration.multinode.min_nodes=3"])


# --- the pods' environment ------------------------------------------------------------------------------


def test_pods_get_the_endpoints_but_no_credentials():
    environ = {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "AWS_ENDPOINT_URL_S3": "http://seaweedfs:8333",
        "AWS_SECRET_ACCESS_KEY": "sentinel",
        "MLFLOW_TRACKING_PASSWORD": "sentinel",
    }
    assert _validate([S3_OUT], environ=environ).env == {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "AWS_ENDPOINT_URL_S3": "http://seaweedfs:8333",
        "TQDM_MININTERVAL": "30",
    }


def test_a_url_with_credentials_is_refused():
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI carries credentials"):
        _validate([S3_OUT], environ={"MLFLOW_TRACKING_URI": "https://user:secret@mlflow.example"})


# --- names and labels -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "run_name",
    [RUN_NAME, "sweep-lr-2026-05-01-p12-train", "Ünïcode Run/ÄÖ_x", "42-starts-with-a-digit", "", "x" * 300],
)
@pytest.mark.parametrize("nodes", [2, 16, 1000])
def test_job_names_are_dns_labels_that_leave_room_for_the_pod_index(run_name, nodes):
    name = job_name(run_name, OUTPUT, nodes)
    assert DNS_LABEL.match(name), name
    assert len(f"{name}-{nodes - 1}") <= 63
    assert name == job_name(run_name, OUTPUT, nodes)  # a retry of the run: the same job
    job = _validate([S3_OUT, f"orchestration.multinode.nodes={nodes}"], run_name=run_name)  # accepted
    assert job.name == name


def test_job_names_show_the_run_and_differ_per_output_dir():
    name = job_name(RUN_NAME, OUTPUT, 2)
    assert name.startswith("strong-resnet50-train-")
    assert job_name(RUN_NAME, OUTPUT.replace("0b9e", "0b9f"), 2) != name
    # Long names of sweep points that differ only at the end stay distinct (the digest is kept).
    long_a, long_b = "sweep-" + "a" * 80 + "-p1", "sweep-" + "a" * 80 + "-p2"
    assert job_name(long_a, OUTPUT + "/p1", 2) != job_name(long_b, OUTPUT + "/p2", 2)


@pytest.mark.parametrize(
    "text", ["strong-resnet50-train", "a b/c:d", "-._edge._-", "é" * 10, "x" * 63, "x" * 64, "y" * 200]
)
def test_label_values_are_valid(text):
    value = label_value(text)
    assert LABEL_VALUE.match(value) and len(value) <= 63, value
    if re.fullmatch(r"[A-Za-z0-9][-A-Za-z0-9_.]{0,61}[A-Za-z0-9]", text):
        assert value == text  # valid values pass unchanged


def test_shortened_label_values_stay_distinct():
    assert label_value("z" * 100 + "1") != label_value("z" * 100 + "2")


def test_run_labels_name_the_flow_run_without_prefects_own_prefix():
    labels = run_labels("0b9e6f3c-5a1d-4a8e-9c0b-6f1e2d3c4b5a", "Sweep lr=0.01 / p3", "root-id")
    assert labels == {
        "cityseg-ops/flow-run-id": "0b9e6f3c-5a1d-4a8e-9c0b-6f1e2d3c4b5a",
        "cityseg-ops/flow-run-name": "Sweep-lr-0.01-p3",
        "cityseg-ops/root-flow-run-id": "root-id",
    }
    assert run_labels(None, None) == {}
