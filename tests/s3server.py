"""A real S3-compatible endpoint for tests: moto's server on 127.0.0.1, in its own process."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing-access-key",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key-sentinel",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Loopback servers never go through a proxy. urllib's default opener reads the proxy variables once, on
# its first use in the process, so a test that points them at a dead proxy must not decide for later ones.
LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def wait_for_http(url: str, timeout: float = 60.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server for {url} exited with code {process.returncode}")
        try:
            with LOOPBACK.open(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


@contextmanager
def moto_server() -> Iterator[str]:
    """Start ``moto.server`` on a free port; yields its endpoint URL. Sets no environment variables."""
    port = free_port()
    with tempfile.TemporaryFile() as log:
        # stdin: not the test process's (under pytest-xdist that is the worker's channel to the controller).
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        endpoint = f"http://127.0.0.1:{port}"
        try:
            try:
                wait_for_http(f"{endpoint}/moto-api/", process=process)
            except (TimeoutError, RuntimeError) as exc:
                log.seek(0)
                raise RuntimeError(
                    f"{exc}; moto's output:\n{log.read().decode(errors='replace')[-3000:]}"
                ) from None
            yield endpoint
        finally:
            process.terminate()
            process.wait(timeout=10)
