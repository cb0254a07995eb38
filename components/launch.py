"""Start and supervise training from the orchestrator's process (the Prefect worker, a notebook).

    launch_training(cfg)   # torchrun -m components.train on this node; returns its TrainResult

Runs nothing of the training itself: it writes the config, starts ``torchrun`` (one rank per visible
GPU, or 1 on CPU), relays the ranks' output to this module's logger, forwards a SIGTERM sent to this
process (preemption) to torchrun, and reads the result file rank 0 wrote. Rank 0's progress records
(``components.train_contract.EpochProgress`` lines) go to the caller's ``on_epoch`` instead of the log: the
orchestrator shows them its own way (the train stage: Prefect artifacts) without importing it here.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from components.config import Config
from components.train_contract import OnEpoch, TrainingError, TrainResult, read_result, relay_progress

logger = logging.getLogger(__name__)

"""Called in the launching thread with each of rank 0's progress records: at the start, after every epoch."""


def launch_training(cfg: Config, nproc: int | None = None, on_epoch: OnEpoch | None = None) -> TrainResult:
    """Run ``torchrun -m components.train`` on this node (one process per visible GPU, or 1 on CPU).

    Output is streamed to this module's logger, progress records to ``on_epoch``; a non-zero exit raises
    TrainingError with the exit code and the last lines (a preempted run can simply be launched again: it
    resumes).
    """
    nproc = nproc or max(1, torch.cuda.device_count())
    # One file per launch: concurrent flow runs (a sweep's points) share run_dir.
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="train_config-", dir=cfg.run_dir) as config:
        config.write(cfg.to_yaml())
        config.flush()
        exit_code, command, errors, tail = _run_torchrun(nproc, config.name, on_epoch)
    if exit_code != 0:
        raise TrainingError(
            f"training exited with code {exit_code} ({' '.join(command)}); rerunning with the same "
            f"train.output_dir={cfg.train.output_dir} resumes from its last checkpoint.\nErrors:\n"
            + "\n".join(errors)
            + "\nLast output:\n"
            + "\n".join(tail),
            exit_code,
        )
    return read_result(cfg.train.output_dir, "training")


def _run_torchrun(
    nproc: int, config_path: str, on_epoch: OnEpoch | None
) -> tuple[int, list[str], list[str], list[str]]:
    """torchrun's exit code, its command line, the error lines and the last lines of its output."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--standalone",
        "-m",
        "components.train",
        "--recipe",
        config_path,
    ]
    package_parent = str(Path(__file__).resolve().parent.parent)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")])),
        # Piped output is read line by line: keep progress bars from flooding it.
        "TQDM_MININTERVAL": os.environ.get("TQDM_MININTERVAL", "30"),
        # Spinning OpenMP threads make CPU training several times slower whenever the cores are shared
        # (MobileNet, batch 8, 2 busy cores: 6.5 s/step spinning, 2.0 s passive); no effect on GPU work.
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
    }
    logger.info("launching %s", " ".join(command))
    tail: collections.deque[str] = collections.deque(maxlen=20)
    # torchrun's own failure report is long enough to push the ranks' error messages out of the tail.
    errors: collections.deque[str] = collections.deque(maxlen=10)
    with (
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env
        ) as process,
        _forward_sigterm(process),
    ):
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip()
            if not line.strip():  # what a closing progress bar leaves behind
                continue
            if relay_progress(line, on_epoch):
                continue
            tail.append(line)
            # "error: " may follow an unfinished progress bar on the same line.
            if " ERROR " in line or "Error:" in line or "error: " in line:
                errors.append(line)
            logger.info("%s", line)
        exit_code = process.wait()
    return exit_code, command, list(errors), list(tail)


@contextlib.contextmanager
def _forward_sigterm(process: subprocess.Popen) -> Iterator[None]:
    """Pass a SIGTERM sent to us (e.g. a pod's PID 1) on to torchrun, which passes it to every rank."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: process.send_signal(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
