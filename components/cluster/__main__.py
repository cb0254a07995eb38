"""``python -m components.cluster``: print a multi-node training job's manifests, or the launcher Role.

    python -m components.cluster --recipe strong --image <registry>/cityseg-ops:<tag> \\
        --job-name finetune-<run> train.output_dir=s3://bucket/runs/<run> | kubectl apply -f -
    python -m components.cluster --rbac | kubectl apply -f -   # the Role the flow's pod needs to run jobs

The job passes the same rules as the train stage's (``components/cluster/rules.py``), with this shell's
endpoints (``MLFLOW_TRACKING_URI``, ``AWS_ENDPOINT_URL_S3``...) as the pods' environment.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from components.cli import run_cli
from components.cluster.manifests import rbac_manifests, to_yaml, training_manifests
from components.cluster.rules import validate_job
from components.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m components.cluster",
        description="Print the Kubernetes manifests of a multi-node training job (kubectl apply -f -).",
    )
    parser.add_argument("--recipe", default="strong", help="recipe name (the pods cannot read a YAML file)")
    parser.add_argument(
        "--image",
        help="the project image, e.g. <registry>/cityseg-ops:<sha> (default: orchestration.multinode.image)",
    )
    parser.add_argument("--job-name", help="DNS label naming the job, its Service and pods")
    parser.add_argument(
        "--rbac", action="store_true", help="print the Role + RoleBinding the flow's pod needs instead"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. orchestration.multinode.nodes=4")
    args = parser.parse_args(argv)
    if not args.rbac and not args.job_name:
        parser.error("--job-name is required (or --rbac)")

    def render() -> None:
        if args.rbac:
            manifests = rbac_manifests(load_config(args.recipe, args.overrides))
        else:
            job = validate_job(args.recipe, args.overrides, job_name=args.job_name, image=args.image)
            manifests = training_manifests(job)
        command = shlex.join(sys.argv[1:] if argv is None else argv)
        sys.stdout.write(f"# rendered by: python -m components.cluster {command}\n")
        sys.stdout.write(to_yaml(manifests))

    return run_cli(render)


if __name__ == "__main__":
    raise SystemExit(main())
