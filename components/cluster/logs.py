"""Relaying pod 0's log to the caller: a thread follows the pod's log stream (and a replacement pod 0),
and the caller's thread logs the lines, handing rank 0's progress records (``EpochProgress``) to its
``on_epoch`` instead, as ``components.launch`` does for torchrun on one node.

Pod 0 carries global rank 0: torchrun's c10d rendezvous numbers the agents by host name, and pod 0's
(``<job>-0.<job>...``) sorts first.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
import time
from typing import Any

from components.cluster.api import KubeJobs
from components.cluster.status import pod_ended, pod_waiting_reason
from components.train_contract import OnEpoch, relay_progress

logger = logging.getLogger(__name__)

IMAGE_PULL_GRACE_S = 600.0
"""How long pod 0 may keep failing to pull its image (ErrImagePull, ImagePullBackOff: a registry outage
heals) before the run fails; an image that can never start (InvalidImageName) fails it at once. Without
this a wrong tag would wait out activeDeadlineSeconds (24 h by default)."""
_PULL_RETRYING = frozenset({"ErrImagePull", "ImagePullBackOff"})
_NEVER_STARTS = frozenset({"InvalidImageName", "ErrImageNeverPull"})


class Rank0LogFollower(threading.Thread):
    """Relays pod 0's log lines (and why it is still pending) into a queue the caller's thread logs
    from: log records need the caller's context (Prefect sends a flow run's logs from its own thread).
    A replacement pod 0 is followed next; a re-opened stream of the same pod skips what was relayed."""

    def __init__(self, jobs: KubeJobs, name: str, lines: queue.Queue[str], interval_s: float) -> None:
        super().__init__(name=f"log-{name}", daemon=True)
        self.jobs, self.job, self.lines, self.interval_s = jobs, name, lines, interval_s
        self.job_ended = threading.Event()
        """Set by the caller: return once the current pod's log is drained."""
        self.cannot_start: str | None = None
        """Why pod 0 will not start (its image), for the caller to fail the run with."""
        self._pull_failing_since: float | None = None
        self._stop_now = threading.Event()
        self._response: Any = None
        self._lock = threading.Lock()

    def stop(self) -> None:
        self._stop_now.set()
        with self._lock:
            if self._response is not None:
                with contextlib.suppress(Exception):
                    self._response.shutdown()  # unblocks a read in progress (urllib3 >= 2.3)

    def run(self) -> None:
        relayed: collections.Counter[str] = collections.Counter()  # pod uid -> lines relayed
        drained: set[str] = set()
        last_note = None
        while not self._stop_now.is_set():
            try:
                pod = self._current_pod(drained)
                if pod is None:
                    if self.job_ended.is_set():
                        return
                else:
                    note = pod_waiting_reason(pod)
                    if note is None:
                        self._relay(pod, relayed)
                        if self._terminated(pod):
                            drained.add(pod.metadata.uid)
                            continue
                    elif note != last_note:
                        self.lines.put(f"[pod {pod.metadata.name}] {note}")
                        last_note = note
                    self._check_image(note)
            except Exception as exc:  # the API, the stream: try again; the caller decides about the job
                logger.debug("following %s's pod 0: %s", self.job, exc)
            self._stop_now.wait(self.interval_s)

    def _check_image(self, note: str | None) -> None:
        reason = (note or "").partition(":")[0]
        if reason not in _PULL_RETRYING:
            self._pull_failing_since = None
        elif self._pull_failing_since is None:
            self._pull_failing_since = time.monotonic()
        failing_s = time.monotonic() - (self._pull_failing_since or time.monotonic())
        if reason in _NEVER_STARTS or failing_s > IMAGE_PULL_GRACE_S:
            self.cannot_start = note

    def _current_pod(self, drained: set[str]) -> Any | None:
        pods = [pod for pod in self.jobs.rank0_pods(self.job) if pod.metadata.uid not in drained]

        def newest_running(pod: Any) -> tuple[Any, bool]:
            return pod.metadata.creation_timestamp, not pod_ended(pod)

        return max(pods, key=newest_running, default=None)

    def _relay(self, pod: Any, relayed: collections.Counter[str]) -> None:
        from kubernetes.watch.watch import iter_resp_lines

        uid, seen = pod.metadata.uid, 0
        response = self.jobs.open_log(pod.metadata.name)
        with self._lock:
            self._response = response
        try:
            if self._stop_now.is_set():  # stop() came before there was a response to shut
                return
            for line in iter_resp_lines(response):
                if self._stop_now.is_set():
                    return
                seen += 1
                if seen > relayed[uid]:
                    relayed[uid] = seen
                    if line.strip():  # what a closing progress bar leaves behind
                        self.lines.put(line.rstrip())
        finally:
            with self._lock:
                self._response = None
            with contextlib.suppress(Exception):
                response.release_conn()

    def _terminated(self, pod: Any) -> bool:
        current = self.jobs.read_pod(pod.metadata.name)
        return current is None or current.metadata.uid != pod.metadata.uid or pod_ended(current)


def relay_lines(
    lines: queue.Queue[str], tail: collections.deque[str], on_epoch: OnEpoch | None, wait_s: float
) -> None:
    """Hand what the follower queued on, in the caller's thread: progress records to ``on_epoch``, the
    other lines to this module's logger and ``tail``; wait up to ``wait_s`` for the first line."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic())) if wait_s else lines.get_nowait()
        except queue.Empty:
            return
        wait_s = 0  # then only what is already there
        if relay_progress(line, on_epoch):
            continue
        tail.append(line)
        logger.info("%s", line)
