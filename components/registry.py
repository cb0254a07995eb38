"""The register step: put an exported model into the MLflow Model Registry and decide champion/challenger.

    python -m components.registry --run-id <training run> --checkpoint <ckpt> --onnx <model.onnx> \\
        --val-miou 0.61 --baseline-miou 0.12 --fingerprint <dataset fingerprint> [section.key=value ...]

What a registered version holds, and the promotion gate (``registry.promotion_margin``), are in
``components/tracking/registry_write.py``: every MLflow call lives in ``components/tracking/``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from components.cli import run_cli
from components.config import Config, load_config
from components.model import load_model
from components.tracking.registry_write import RegistrationResult, register_and_promote


def register_model(
    cfg: Config,
    train_run_id: str,
    checkpoint_uri: str,
    onnx_path: str,
    val_miou: float,
    baseline_miou: float,
    dataset_fingerprint: str,
) -> RegistrationResult:
    """Register the model trained in ``train_run_id`` (weights from ``checkpoint_uri``, ONNX file
    ``onnx_path``) as ``cfg.registry.model_name`` and set its aliases; a re-run registers nothing new."""
    return register_and_promote(
        cfg,
        train_run_id,
        lambda: load_model(checkpoint_uri)[0],
        onnx_path,
        val_miou,
        baseline_miou,
        dataset_fingerprint,
    )


def registration_text(registered: dict[str, Any]) -> str:
    """``**name vN**`` with its aliases and whether it is the champion now (from a RegistrationResult's
    dict)."""
    aliases = ", ".join(registered["aliases"]) or "none"
    return (
        f"**{registered['name']} v{registered['version']}**, aliases: {aliases}, "
        f"promoted: {registered['promoted']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Register an exported model and decide its aliases.")
    parser.add_argument("--recipe", default="strong")
    parser.add_argument("--run-id", required=True, help="the training run's MLflow id")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--onnx", required=True)
    parser.add_argument("--val-miou", type=float, required=True)
    parser.add_argument("--baseline-miou", type=float, required=True)
    parser.add_argument("--fingerprint", required=True, help="dataset fingerprint")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    def run() -> None:
        result = register_model(
            load_config(args.recipe, args.overrides),
            args.run_id,
            args.checkpoint,
            args.onnx,
            args.val_miou,
            args.baseline_miou,
            args.fingerprint,
        )
        print(json.dumps({**asdict(result), "model_uri": result.model_uri}, indent=2))

    return run_cli(run)


if __name__ == "__main__":
    raise SystemExit(main())
