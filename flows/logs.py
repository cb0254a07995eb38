"""The project's log records in the flow run's Prefect logs, under any worker.

Every flow calls ``show_project_logs()`` first. Prefect's ``PREFECT_LOGGING_EXTRA_LOGGERS`` is not enough:
its ``setup_logging`` only gives the named loggers the handlers of ``prefect.extra`` (the one to the API),
never a level, so they keep the root logger's WARNING (Prefect's logging.yml) and drop every INFO record:
the relayed torchrun output with the epoch lines, "resuming after epoch N", the evaluation and export
summaries. Setting both here, in the flows, works under every worker (process, Docker, Kubernetes) and
from the CLI, with no environment variable to forget.
"""

from __future__ import annotations

import logging

from prefect.logging.configuration import ensure_logging_setup

PROJECT_LOGGERS = ("components", "flows")


def show_project_logs() -> None:
    """Send the INFO records of ``components.*`` and ``flows.*`` to the console and this flow run's logs.

    The API handlers are those Prefect's logging config gives ``prefect.extra`` (what the environment
    variable would attach), so a custom logging.yml still decides. Idempotent; a lower level set by the
    user (DEBUG) is kept.
    """
    ensure_logging_setup()  # creates prefect.extra's handlers; in a flow run Prefect did it on import
    api_handlers = logging.getLogger("prefect.extra").handlers
    for name in PROJECT_LOGGERS:
        project_logger = logging.getLogger(name)
        if project_logger.getEffectiveLevel() > logging.INFO:
            project_logger.setLevel(logging.INFO)
        for handler in api_handlers:
            if handler not in project_logger.handlers:
                project_logger.addHandler(handler)
