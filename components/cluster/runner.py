"""Running one multi-node training job end to end from the orchestrator's process: submit, follow,
clean up, SIGTERM.

    result = train_on_cluster("strong", overrides, run_name="strong-resnet50-train", on_epoch=...)

The Kubernetes counterpart of ``components.launch.launch_training``: it validates the job
(``rules.validate_job``), renders it (``manifests``: an Indexed Job + headless Service, or a Kubeflow
TrainJob), submits it (``api``), follows it to its end while relaying pod 0's log to the caller
(``logs``: lines to the log, rank 0's progress records to ``on_epoch``), then reads
``<train.output_dir>/train_result.json`` (``s3://``) and returns the ``TrainResult``. A failed job raises
``TrainingError`` naming the job, the reason Kubernetes gives and pod 0's last lines.

The job (and its Service) is deleted when it ends, when it fails and when the caller stops (an exception,
KeyboardInterrupt, SIGTERM: Prefect's engine turns a cancelled flow run's SIGTERM into an exception, and
outside Prefect this module does). A job left behind by a killed caller is stopped by
``activeDeadlineSeconds`` and deleted ``ttlSecondsAfterFinished`` after it ends; a rerun with the same
name replaces it. The name comes from the run's name plus a digest of ``train.output_dir``: a rerun (a
retry of the flow run) gets the same job name and resumes from the same checkpoints.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from components.cluster.api import KubeJobs, api_client, retrying
from components.cluster.logs import Rank0LogFollower, relay_lines
from components.cluster.manifests import training_manifests
from components.cluster.names import run_labels
from components.cluster.rules import validate_job
from components.cluster.status import JobState, job_state
from components.train_contract import OnEpoch, TrainingError, TrainingInterrupted, TrainResult, read_result

logger = logging.getLogger(__name__)

POLL_S = 10.0
"""Seconds between reads of the job's status (and retries of pod 0's log)."""
DELETE_WAIT_S = 300.0
"""Longest wait for a leftover job's pods to go before its replacement is created."""


def train_on_cluster(
    recipe: str,
    overrides: Sequence[str],
    *,
    run_name: str,
    flow_run_id: str | None = None,
    root_flow_run_id: str | None = None,
    on_epoch: OnEpoch | None = None,
    image: str | None = None,
    api: Any = None,
    poll_s: float | None = None,
) -> TrainResult:
    """Run recipe + ``overrides`` as a multi-node Kubernetes job, follow it to its end, return its result.

    ``run_name`` names the job and, with the flow run ids, labels it (``names.run_labels``);
    ``on_epoch`` receives rank 0's progress records, in this thread; ``image`` defaults to
    ``orchestration.multinode.image``; ``api``: a ``kubernetes.client.ApiClient`` (default
    ``api.api_client()``); ``poll_s``: default ``POLL_S``.
    """
    poll_s = poll_s or POLL_S
    job = validate_job(recipe, overrides, run_name=run_name, image=image)
    cfg, name = job.cfg, job.name
    settings = cfg.orchestration.multinode
    manifests = training_manifests(job, run_labels(flow_run_id, run_name, root_flow_run_id))
    jobs = KubeJobs(api if api is not None else api_client(), settings.namespace, settings.engine)
    where = f"{settings.namespace}/{name}"
    tail: collections.deque[str] = collections.deque(maxlen=30)
    with _sigterm_raises(where):
        try:
            _remove_leftover(jobs, name, poll_s)
            retrying(lambda: jobs.create(manifests), f"creating job {where}", retry_s=0)
            logger.info(
                "training job %s (%s): %d node(s) x %d GPU(s), image %s, checkpoints in %s",
                where, settings.engine, settings.nodes, settings.gpus_per_node, job.image,
                cfg.train.output_dir,
            )  # fmt: skip
            state = _follow(jobs, name, where, poll_s, tail, on_epoch)
        finally:
            _delete_quietly(jobs, name, where)
    if not state.succeeded:
        raise TrainingError(
            f"training job {where} failed ({state.reason}: {state.message}); rerunning with the same "
            f"train.output_dir={cfg.train.output_dir} resumes from its last checkpoint.\n"
            "Last output of pod 0:\n" + "\n".join(tail)
        )
    return read_result(cfg.train.output_dir, where)


def _remove_leftover(jobs: KubeJobs, name: str, poll_s: float) -> None:
    """A job of the same name (a killed earlier attempt) goes first, with its pods: they hold pod 0's
    host name and the rendezvous port."""
    where = f"{jobs.namespace}/{name}"
    existing = retrying(lambda: jobs.read(name), f"reading job {where}")
    if existing is not None:
        state = job_state(existing)
        logger.warning(
            "replacing the earlier job %s (%s); the new one resumes from the checkpoints",
            where, "ended" if state.finished else f"still running: {state.summary}",
        )  # fmt: skip
    retrying(lambda: jobs.delete(name, foreground=True), f"deleting job {where}")
    deadline = time.monotonic() + DELETE_WAIT_S
    while not retrying(lambda: jobs.gone(name), f"reading job {where}"):
        if time.monotonic() > deadline:
            raise TrainingError(f"the earlier job {where} is still being deleted after {DELETE_WAIT_S:.0f} s")
        time.sleep(poll_s)


def _follow(
    jobs: KubeJobs,
    name: str,
    where: str,
    poll_s: float,
    tail: collections.deque[str],
    on_epoch: OnEpoch | None,
) -> JobState:
    """Poll the job until it finishes, relaying pod 0's lines as they come."""
    lines: queue.Queue[str] = queue.Queue()
    follower = Rank0LogFollower(jobs, name, lines, poll_s)
    follower.start()
    last_summary = None
    try:
        while True:
            job = retrying(lambda: jobs.read(name), f"reading job {where}")
            if job is None:
                raise TrainingError(f"training job {where} disappeared before it ended (deleted by someone?)")
            state = job_state(job)
            if state.summary != last_summary:
                logger.info("job %s: %s", where, state.summary)
                last_summary = state.summary
            if state.finished:
                break
            relay_lines(lines, tail, on_epoch, wait_s=poll_s)
            if follower.cannot_start:
                raise TrainingError(
                    f"training job {where}: pod 0 cannot start ({follower.cannot_start}); check "
                    "orchestration.multinode.image and that the nodes can pull it"
                )
        follower.job_ended.set()  # pod 0's last lines may still be on their way
        deadline = time.monotonic() + max(30.0, 3 * poll_s)
        while follower.is_alive() and time.monotonic() < deadline:
            relay_lines(lines, tail, on_epoch, wait_s=min(poll_s, 0.5))
    finally:
        follower.stop()
        follower.join(timeout=5)
        relay_lines(lines, tail, on_epoch, wait_s=0)
    return state


def _delete_quietly(jobs: KubeJobs, name: str, where: str) -> None:
    try:
        jobs.delete(name)
        logger.info("deleted job %s", where)
    except Exception as exc:  # never hide why the run ended; the job's TTL removes it
        logger.warning("could not delete job %s (%s); ttlSecondsAfterFinished removes it later", where, exc)


@contextlib.contextmanager
def _sigterm_raises(where: str) -> Iterator[None]:
    """SIGTERM raises TrainingInterrupted here, so the job is deleted on the way out, where no one else
    (Prefect's engine) has made it an exception already. A second SIGTERM does not stop the clean-up."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def interrupt(_signum: int, _frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise TrainingInterrupted(
            f"SIGTERM: stopping the training job {where}; a rerun resumes from its last checkpoint"
        )

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
