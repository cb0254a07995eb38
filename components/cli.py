"""What every ``python -m components.<x>`` entry point shares: logging set-up and error handling."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from components.errors import CitysegError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def run_cli(body: Callable[[], int | None], log_format: str = LOG_FORMAT) -> int:
    """Run a CLI's body and return its exit code.

    A ``CitysegError`` (bad config, data, model...) is the user's to fix, not a bug: it becomes one line
    on stderr and exit code 1 (or the error's own ``exit_code``, e.g. 143 for an interrupted training).
    Anything else is a bug and keeps its traceback.
    """
    logging.basicConfig(level=logging.INFO, format=log_format)
    try:
        return body() or 0
    except CitysegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
