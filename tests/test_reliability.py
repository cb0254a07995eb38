"""Faults survived and secrets kept. Registration survives outages of the MLflow server and of its S3
artifact store (real moto, real MLflow server): retries with backoff, then a clear RegistryError; after
recovery a re-run registers exactly one version per training run and the aliases are consistent.
Inference from and to S3 never shows the S3 secret (download: test_data_download; registry:
test_registry)."""

from __future__ import annotations

import contextlib
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow
import pytest

from tests.mlflowserver import mlflow_server
from tests.s3server import TEST_CREDENTIALS, free_port, moto_server
from tests.test_export import shared_export, tiny_config
from tests.test_registry import NAME, _training_run


class TcpGate:
    """A TCP forwarder on a fixed port in front of a real server. ``close()`` makes the endpoint refuse
    connections and drops the open ones (an outage); ``open()`` brings it back. The server behind keeps
    its state, unlike a restarted in-memory moto."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()

    def open(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        if self._listener is not None:
            # shutdown() first: close() alone leaves a socket listening while a thread is in accept().
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            for conn in self._connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._connections.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:  # the server behind is down too: the client sees its connection dropped
                client.close()
                continue
            with self._lock:
                self._connections += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


@pytest.fixture
def exported(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path) -> tuple[str, Any]:
    """(checkpoint, ExportResult) of the session's shared export."""
    return shared_export(tmp_path_factory, synthetic_root)


@pytest.fixture
def backoff(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The delays registry_write.retry waits (recorded, not slept: the outage lasts until the test ends
    it)."""
    delays: list[float] = []
    # Replace the module's `time`, not time.sleep itself: MLflow's and the gate's threads sleep too.
    monkeypatch.setattr("components.tracking.registry_write.time", SimpleNamespace(sleep=delays.append))
    return delays


@pytest.fixture
def client_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients talk to the MLflow server only; MLflow's own HTTP retries are off so registry_write.retry is
    the one retry loop under test."""
    for name in [*TEST_CREDENTIALS, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


@pytest.mark.slow
def test_registration_recovers_from_mlflow_and_s3_outages(
    tmp_path: Path, exported, monkeypatch, backoff, client_env
) -> None:
    from components.errors import RegistryError
    from components.predict import resolve_onnx
    from components.registry import register_model

    checkpoint, export = exported
    cfg = tiny_config("tracking.system_metrics=false", f"run_dir={tmp_path}")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    def register(run_id: str, miou: float):
        return register_model(cfg, run_id, checkpoint, export.onnx_path, miou, 0.4, "fp")

    # Clients -> gate -> MLflow server -> gate -> moto: either link can be cut and restored.
    with (
        moto_server() as s3,
        _gate(s3) as s3_gate,
        mlflow_server(tmp_path / "mlflow", s3_gate.url) as srv,
        _gate(srv.tracking_uri) as mlflow_gate,
    ):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_gate.url)
        # Explicit URIs: an earlier test in this process may have left MLflow's global tracking URI set.
        client = mlflow.MlflowClient(tracking_uri=mlflow_gate.url, registry_uri=mlflow_gate.url)
        run1 = _training_run(cfg)

        # 1. The MLflow server is down: 4 attempts 1 s, 2 s, 4 s apart, then a RegistryError.
        mlflow_gate.close()
        with pytest.raises(RegistryError, match=rf"unreachable \({mlflow_gate.url}\) after 4 attempts"):
            register(run1, 0.5)
        assert backoff == [1.0, 2.0, 4.0]
        mlflow_gate.open()
        assert client.search_model_versions(f"name = '{NAME}'") == []
        first = register(run1, 0.5)
        assert (first.version, first.created, first.aliases) == ("1", True, ["challenger", "champion"])
        assert register(run1, 0.5).created is False

        # 2. S3 is down behind a running MLflow server: artifact uploads fail, retried, then refused.
        run2 = _training_run(cfg)
        backoff.clear()
        s3_gate.close()
        with pytest.raises(RegistryError, match=r"after 4 attempts.*S3 endpoint are up") as refused:
            register(run2, 0.6)
        assert "artifact store" in str(refused.value)
        assert backoff == [1.0, 2.0, 4.0]
        assert [v.version for v in client.search_model_versions(f"name = '{NAME}'")] == ["1"]
        assert client.get_model_version_by_alias(NAME, "champion").version == "1"
        s3_gate.open()
        second = register(run2, 0.6)
        assert (second.version, second.created, second.promoted) == ("2", True, True)

        # Exactly one version per training run; the aliases point where the decisions say.
        versions = client.search_model_versions(f"name = '{NAME}'")
        assert sorted((v.version, v.tags["training_run_id"]) for v in versions) == [("1", run1), ("2", run2)]
        assert client.get_model_version(NAME, "1").aliases == []
        assert sorted(client.get_model_version(NAME, "2").aliases) == ["challenger", "champion"]
        assert client.get_run(run2).info.status == "FINISHED"
        # The recovered version's artifacts are complete: its ONNX file is the exported one.
        pulled = resolve_onnx(f"models:/{NAME}@champion", str(tmp_path / "cache"))
        assert pulled.read_bytes() == Path(export.onnx_path).read_bytes()
    # Failed attempts left no model-sized scratch copies behind.
    assert list(scratch.glob("cityseg-registry-*")) == []


@contextlib.contextmanager
def _gate(endpoint: str) -> Iterator[TcpGate]:
    gate = TcpGate(int(endpoint.rsplit(":", 1)[1]))
    gate.open()
    try:
        yield gate
    finally:
        gate.close()


def test_predict_over_s3_keeps_the_secret(
    s3_endpoint: str, tmp_path: Path, exported, synthetic_root: Path, caplog, capfd
) -> None:
    from components import storage
    from components.errors import ModelError
    from components.predict import predict

    secret = TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
    caplog.set_level("DEBUG")  # botocore's request logging included
    onnx_file = exported[1].onnx_path
    storage.s3_client().create_bucket(Bucket="inference")
    storage.upload(onnx_file, "s3://inference/models/model.onnx")
    sources = sorted((synthetic_root / "leftImg8bit" / "val").rglob("*.png"))[:2]
    for path in sources:
        storage.upload(path, f"s3://inference/images/{path.name}")

    out = tmp_path / "out"
    written = predict(
        "s3://inference/models/model.onnx", "s3://inference/images", str(out),
        cache_dir=str(tmp_path / "cache"), progress=False,
    )  # fmt: skip
    assert sorted(p.name for p in written) == sorted(p.name for p in sources)
    with pytest.raises(ModelError) as missing:
        predict("s3://inference/models/absent.onnx", "s3://inference/images", str(tmp_path / "x"))

    captured = capfd.readouterr()
    texts = [caplog.text, captured.out, captured.err, str(missing.value)]
    assert "s3://inference/models/absent.onnx" in str(missing.value)
    assert [t for t in texts if secret in t] == []
    assert [p for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()] == []


def test_rotated_s3_keys_take_effect_without_a_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    from components import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "old-secret")
    old = storage.s3_client()
    assert storage.s3_client() is old, "one client per key set"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "new-secret")  # same key id, new secret
    new = storage.s3_client()
    assert new is not old
    assert new._request_signer._credentials.secret_key == "new-secret"


def test_a_cut_off_trainid_png_is_regenerated(tmp_path: Path) -> None:
    from components.data.synth import generate_synthetic_cityscapes
    from components.data.trainids import create_trainid_labels

    root = generate_synthetic_cityscapes(tmp_path / "ds", train=2, val=1, height=32, width=64, cities=1)
    assert create_trainid_labels(root, workers=1, progress=False) == 3
    outputs = sorted(root.glob("gtFine/*/*/*_labelTrainIds.png"))
    expected = {path: path.read_bytes() for path in outputs}
    # Newer than its annotation, so only its content can tell that it is incomplete.
    outputs[0].write_bytes(expected[outputs[0]][: len(expected[outputs[0]]) // 2])

    assert create_trainid_labels(root, workers=1, progress=False) == 1
    assert {path: path.read_bytes() for path in outputs} == expected
    assert create_trainid_labels(root, workers=1, progress=False) == 0
