"""Elastic multi-node training on one machine: two torchrun agents (one rank each, gloo) meeting at a c10d
rendezvous on 127.0.0.1, launched exactly as the Kubernetes pods launch them
(``components.cluster.manifests``).

- The two agents train like one process with the same global batch (float64, as tests/test_train_ddp.py).
- SIGKILL one agent and its rank mid-epoch (a lost node) and start it again: the other agent's rank fails,
  its agent restarts it, both re-form the group, resume from the last checkpoint and end bit-exact with
  the uninterrupted two-agent run.
- A rank that hangs (SIGSTOP) is detected: the others fail with CollectiveTimeout after
  ``train.collective_timeout_s``, they do not wait forever.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import torch

from components import distributed
from components.checkpoint import load_checkpoint
from components.cluster.manifests import AGENT_ENV, torchrun_flags
from components.config import Config
from components.launch import launch_training
from components.train import train
from components.train_contract import TrainingError
from tests.s3server import free_port
from tests.test_train import one_thread, tiny_config  # noqa: F401  (one_thread is a fixture)
from tests.test_train_ddp import DETERMINISTIC_SPLIT, assert_trained_alike

REPO = Path(__file__).resolve().parent.parent
EPOCHS = 2
ELASTIC = [
    *DETERMINISTIC_SPLIT,
    f"train.epochs={EPOCHS}",
    "train.log_every=1",
    "orchestration.multinode.nodes=2",
    "orchestration.multinode.gpus_per_node=1",  # one rank per agent
    "orchestration.multinode.max_restarts=2",
]
"""The 64x128 fixture has 8 training images: 2 steps of 4 per epoch, each rank taking 2."""


@dataclass
class Agent:
    """One torchrun agent, standing for one node (pod)."""

    command: list[str]
    log: Path
    env: dict[str, str]
    process: subprocess.Popen | None = field(default=None)

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.command,
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill_node(self) -> None:
        """SIGKILL the agent and its ranks together, as when the node is lost (torchrun starts each rank
        in a session of its own: killing the agent's process group would leave its rank running)."""
        assert self.process is not None
        agent = psutil.Process(self.process.pid)
        for process in [agent, *agent.children(recursive=True)]:
            process.kill()

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill_node()
            self.process.wait(30)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _agents(cfg: Config, work: Path) -> list[Agent]:
    """Two agents with the Kubernetes pods' torchrun flags and environment (``components.cluster.manifests``),
    the rendezvous endpoint on 127.0.0.1."""
    config_path = work / "train_config.yaml"
    config_path.write_text(cfg.to_yaml())
    flags = torchrun_flags(cfg.orchestration.multinode, f"127.0.0.1:{free_port()}", rdzv_id=work.name)
    env = {
        **os.environ,
        **AGENT_ENV,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
        "LOGLEVEL": "INFO",  # the agents' own log: rendezvous rounds and worker-group restarts
    }
    entry = ["-m", "components.train", "--recipe", str(config_path)]
    # Which agent hosts the rendezvous store; in a cluster, pod 0, whose address is the endpoint's.
    return [
        Agent([sys.executable, "-m", "torch.distributed.run", *flags, f"--rdzv-conf=is_host={host}", *entry],
              work / f"agent-{index}.log", env)
        for index, host in enumerate(("true", "false"))
    ]  # fmt: skip


def _run_to_the_end(agents: list[Agent], timeout: float = 400) -> None:
    for agent in agents:
        assert agent.wait(timeout) == 0, agent.output()[-4000:]


def _wait_for_line(agents: list[Agent], line: str, timeout: float = 300) -> None:
    """Until one agent's output (rank 0's log) has ``line``."""
    deadline = time.monotonic() + timeout
    while not any(line in agent.output() for agent in agents):
        for agent in agents:
            assert agent.process is not None and agent.process.poll() is None, agent.output()[-4000:]
        assert time.monotonic() < deadline, f"no {line!r} in {timeout} s"
        time.sleep(0.1)


def _final(cfg: Config) -> dict:
    return load_checkpoint(str(Path(cfg.train.output_dir) / f"epoch_{EPOCHS:04d}.pt"))


@pytest.fixture(scope="module")
def uninterrupted(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The final checkpoint of an uninterrupted two-agent run."""
    work = tmp_path_factory.mktemp("two-agents")
    cfg = tiny_config(synthetic_root, work, *ELASTIC)
    agents = _agents(cfg, work)
    try:
        for agent in agents:
            agent.start()
        _run_to_the_end(agents)
    finally:
        for agent in agents:
            agent.stop()
    return _final(cfg)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_two_agents_train_like_one_process(
    uninterrupted: dict, synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    single = train(tiny_config(synthetic_root, tmp_path, *ELASTIC))
    assert_trained_alike(uninterrupted, load_checkpoint(single.last_checkpoint), epochs=EPOCHS)
    # DDP's own timing of the gradient all-reduce is in the epoch metrics (docs/scale-out.md's share).
    metrics = uninterrupted["metrics"]
    assert metrics["ddp_comm_ms"] > 0 and metrics["ddp_compute_ms"] > 0
    assert 0 <= metrics["ddp_comm_exposed_share"] < 1


@pytest.mark.slow
def test_killed_agent_rejoins_and_the_job_ends_bit_exact(
    uninterrupted: dict, synthetic_root: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(synthetic_root, tmp_path, *ELASTIC)
    host, other = agents = _agents(cfg, tmp_path)
    try:
        for agent in agents:
            agent.start()
        _wait_for_line(agents, f"epoch 2/{EPOCHS} step 1/2")  # mid-epoch: epoch 1 is checkpointed
        other.kill_node()
        assert other.wait(30) == -signal.SIGKILL
        assert not (Path(cfg.train.output_dir) / f"epoch_{EPOCHS:04d}.pt").exists()
        other.start()  # the replacement node (the Job controller's new pod)
        _run_to_the_end(agents)
    finally:
        for agent in agents:
            agent.stop()
    # The surviving agent saw its rank fail, restarted it and re-formed the group with the new agent.
    assert "will restart worker group" in host.output(), host.output()[-4000:]
    assert "resuming after epoch 1" in host.output() + other.output()
    resumed = _final(cfg)
    assert resumed["model"].keys() == uninterrupted["model"].keys()
    for name, tensor in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    for index, state in uninterrupted["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(
                torch.as_tensor(resumed["optimizer"]["state"][index][key]), torch.as_tensor(value)
            )
    for metric in ("train_loss", "val_miou"):
        assert resumed["metrics"][metric] == uninterrupted["metrics"][metric], metric


@pytest.mark.slow
def test_a_hung_rank_fails_the_job_with_a_named_error(synthetic_root: Path, tmp_path: Path) -> None:
    # Longer than rank 0's start-up before its first collective (MLflow creates its store: 5 s was too
    # short on a loaded 2-core machine, where the other rank timed out first).
    cfg = tiny_config(synthetic_root, tmp_path, *ELASTIC, "train.collective_timeout_s=20")
    stopped: list[psutil.Process] = []
    freezer = threading.Thread(target=_stop_rank_one_mid_epoch, args=(cfg, stopped), daemon=True)
    freezer.start()
    started = time.monotonic()
    try:
        with pytest.raises(TrainingError) as failed:
            launch_training(cfg, nproc=2)
    finally:
        for process in stopped:  # torchrun SIGKILLs it after the timeout; in case it did not
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
    freezer.join(5)
    assert stopped, "rank 1 was never stopped"
    named = "CollectiveTimeout: rank 0 of 2 waited more than train.collective_timeout_s=20 s"
    assert named in str(failed.value), str(failed.value)
    # 20 s of timeout, then torchrun gives the stopped rank 30 s to exit before it SIGKILLs it.
    assert time.monotonic() - started < 240


def _stop_rank_one_mid_epoch(cfg: Config, stopped: list[psutil.Process]) -> None:
    """SIGSTOP the rank-1 worker once rank 0 has checkpointed epoch 1: it hangs without exiting."""
    marker = Path(cfg.train.output_dir) / "epoch_0001.pt.sha256"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if marker.exists():
            for process in psutil.process_iter(["cmdline"]):
                if cfg.run_dir in " ".join(process.info["cmdline"] or []) and _rank(process) == "1":
                    process.suspend()
                    stopped.append(process)
                    return
        time.sleep(0.05)


def _rank(process: psutil.Process) -> str | None:
    try:
        return process.environ().get("RANK")
    except (psutil.AccessDenied, psutil.NoSuchProcess):
        return None


@pytest.mark.parametrize(
    ("message", "timeout"),
    [
        ("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation", True),
        ("Application timeout caused pair closure", True),
        ("[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7, OpType=ALLREDUCE)", True),
        ("[gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:22759: Connection reset by peer", False),
    ],
)
def test_collective_timeouts_are_told_apart_by_their_message(message: str, timeout: bool) -> None:
    assert distributed.is_timeout(RuntimeError(message)) is timeout
    assert not distributed.is_timeout(ValueError(message))
