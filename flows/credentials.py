"""Credentials for the stages: Prefect Secret blocks first, then the environment.

Secrets are read inside the stage that needs them, never passed as flow parameters, and never logged.
Block names (create them with ``Secret(value=...).save(name)`` or in the UI):

- ``cityscapes-username`` / ``cityscapes-password`` (else ``$CITYSCAPES_USERNAME`` / ``$CITYSCAPES_PASSWORD``)
- ``aws-access-key-id`` / ``aws-secret-access-key`` (else the standard AWS credential chain)
"""

from __future__ import annotations

import logging
import os

from prefect.blocks.system import Secret

logger = logging.getLogger(__name__)

AWS_SECRET_BLOCKS = {
    "AWS_ACCESS_KEY_ID": "aws-access-key-id",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-access-key",
}


def secret_value(block_name: str, env_name: str) -> str | None:
    """The Secret block's value if the block exists, else the environment variable (or None)."""
    try:
        return str(Secret.load(block_name).get())
    except ValueError:  # Secret.load's "no such block"
        return os.environ.get(env_name) or None


def cityscapes_credentials() -> tuple[str, str] | None:
    """(username, password) for cityscapes-dataset.com, or None when none are configured."""
    username = secret_value("cityscapes-username", "CITYSCAPES_USERNAME")
    password = secret_value("cityscapes-password", "CITYSCAPES_PASSWORD")
    return (username, password) if username and password else None


def export_aws_credentials() -> None:
    """Put AWS keys from Secret blocks into this process's environment for boto3, MLflow and torchrun.

    Keys already in the environment win, so containers configured by their orchestrator keep theirs.
    """
    for env_name, block_name in AWS_SECRET_BLOCKS.items():
        if os.environ.get(env_name):
            continue
        value = secret_value(block_name, env_name)
        if value:
            os.environ[env_name] = value
            logger.info("using %s from the Prefect Secret block %r", env_name, block_name)
