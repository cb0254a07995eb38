"""A stub of the Kubernetes API server for tests, on 127.0.0.1: enough REST for the real ``kubernetes``
client to create, read, list and delete namespaced objects and to follow a pod's log (chunked, as the
API server streams it).

It is not a Kubernetes: nothing schedules, no controller runs, no schema is checked. The test plays the
Job controller (adds pods, their log lines, the job's conditions); deleting an object also deletes the
objects it owns (``ownerReferences``) and, for a Job, its pods, as the garbage collector would.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

ROUTE = re.compile(
    r"^/(?P<group>api/v1|apis/[^/]+/[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/]+)"
    r"(?:/(?P<name>[^/]+)(?:/(?P<sub>log))?)?$"
)


class KubeStub:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}  # (collection path, name) -> object
        self.created: list[dict[str, Any]] = []  # every body POSTed, as sent
        self.requests: list[tuple[str, str, dict[str, list[str]]]] = []  # (method, path, query)
        self.logs: dict[str, list[str]] = {}  # pod name -> lines
        self.closed: set[str] = set()  # pods whose container has ended: their log streams end
        self.dropped: set[str] = set()  # pods whose open log streams end once (a dropped connection)
        self.refuse: dict[tuple[str, str], int] = {}  # (method, plural) -> HTTP status to answer
        self.delete_delay = 0  # GETs a deleted object still answers (foreground deletion in progress)
        self._deleting: dict[tuple[str, str], int] = {}
        self.changed = threading.Condition()

    # --- what the test does (the controller's part) ---

    def put(self, collection: str, obj: dict[str, Any]) -> dict[str, Any]:
        metadata = obj.setdefault("metadata", {})
        metadata.setdefault("uid", str(uuid.uuid4()))
        metadata.setdefault("creationTimestamp", _now())
        with self.changed:
            self.objects[(collection, metadata["name"])] = obj
            self.changed.notify_all()
        return obj

    def get(self, collection: str, name: str) -> dict[str, Any] | None:
        with self.changed:
            return self.objects.get((collection, name))

    def update(self, collection: str, name: str, change: Callable[[dict[str, Any]], None]) -> None:
        with self.changed:
            change(self.objects[(collection, name)])
            self.changed.notify_all()

    def remove(self, collection: str, name: str) -> None:
        with self.changed:
            self._delete(collection, name)
            self.changed.notify_all()

    def add_pod(
        self, namespace: str, name: str, labels: dict[str, str], phase: str = "Running", created: str = ""
    ) -> dict[str, Any]:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": labels, "creationTimestamp": created or _now()},
            "status": {"phase": phase},
        }
        with self.changed:
            self.logs.setdefault(name, [])
        return self.put(f"/api/v1/namespaces/{namespace}/pods", pod)

    def log(self, pod: str, *lines: str) -> None:
        with self.changed:
            self.logs.setdefault(pod, []).extend(lines)
            self.changed.notify_all()

    def end_container(self, namespace: str, pod: str, phase: str) -> None:
        """The container exits: its log streams end, then the pod's phase follows."""
        with self.changed:
            self.closed.add(pod)
            self.changed.notify_all()
        self.update(f"/api/v1/namespaces/{namespace}/pods", pod, lambda p: p["status"].update(phase=phase))

    def drop_streams(self, pod: str) -> None:
        with self.changed:
            self.dropped.add(pod)
            self.changed.notify_all()

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not (result := predicate()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("the stub never reached the expected state")
                self.changed.wait(remaining)
            return result

    def calls(self, method: str | None = None) -> list[tuple[str, str]]:
        """(method, path) of the requests so far, optionally of one method."""
        with self.changed:
            return [(m, p) for m, p, _ in self.requests if method in (None, m)]

    # --- the server side ---

    def _delete(self, collection: str, name: str) -> dict[str, Any] | None:
        obj = self.objects.pop((collection, name), None)
        if obj is None:
            return None
        uid = obj["metadata"]["uid"]
        for key, other in list(self.objects.items()):
            owners = other["metadata"].get("ownerReferences") or []
            job_pod = (
                other.get("kind") == "Pod"
                and other["metadata"].get("labels", {}).get("batch.kubernetes.io/job-name") == name
                and collection.endswith("/jobs")
            )
            if job_pod or any(owner.get("uid") == uid for owner in owners):
                self._delete(*key)
                if job_pod:
                    self.closed.add(key[1])
        return obj

    def handle(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        match = ROUTE.match(path)
        if match is None:
            return 404, _status(404, "NotFound", f"no route {path}")
        collection = path if match["name"] is None else path.rsplit("/" + match["name"], 1)[0]
        if match["sub"]:
            collection = collection.rsplit("/" + match["name"], 1)[0]
        plural, name = match["plural"], match["name"]
        if (method, plural) in self.refuse:
            code = self.refuse[(method, plural)]
            return code, _status(
                code, "Forbidden", f'{plural} is forbidden: User "system:sa" cannot {method}'
            )
        with self.changed:
            if method == "POST" and name is None:
                self.created.append(json.loads(json.dumps(body)))
                if (collection, body["metadata"]["name"]) in self.objects:
                    return 409, _status(409, "AlreadyExists", f"{plural} {body['metadata']['name']} exists")
                return 201, self.put(collection, body)
            if method == "GET" and name is None:
                wanted = dict(
                    part.split("=", 1) for part in query.get("labelSelector", [""])[0].split(",") if part
                )
                items = [
                    obj
                    for (where, _), obj in self.objects.items()
                    if where == collection and wanted.items() <= obj["metadata"].get("labels", {}).items()
                ]
                return 200, {"apiVersion": "v1", "kind": "List", "metadata": {}, "items": items}
            if method == "GET" and (collection, name) in self._deleting:
                self._deleting[(collection, name)] -= 1
                obj = self._deleting[(collection, name)] >= 0 and self.objects.get((collection, name))
                if obj:
                    obj["metadata"]["deletionTimestamp"] = _now()
                    return 200, obj
                self._deleting.pop((collection, name))
                self._delete(collection, name)
                self.changed.notify_all()
            if method == "GET" and (collection, name) in self.objects:
                return 200, self.objects[(collection, name)]
            if method == "DELETE" and (collection, name) in self.objects:
                # As the API server: the object, deleted or (foreground) marked for deletion.
                obj = self.objects[(collection, name)]
                if self.delete_delay and query.get("propagationPolicy") == ["Foreground"]:
                    self._deleting[(collection, name)] = self.delete_delay
                    obj["metadata"]["deletionTimestamp"] = _now()
                else:
                    self._delete(collection, name)
                self.changed.notify_all()
                return 200, obj
        return 404, _status(404, "NotFound", f'{plural} "{name}" not found')

    def stream_log(self, pod: str, write: Callable[[bytes], None]) -> None:
        sent = 0
        while True:
            with self.changed:
                while (
                    sent == len(self.logs.get(pod, [])) and pod not in self.closed and pod not in self.dropped
                ):
                    self.changed.wait(1.0)
                lines = self.logs.get(pod, [])[sent:]
                done = pod in self.closed
                dropped = pod in self.dropped
                self.dropped.discard(pod)
            for line in lines:
                write(f"{line}\n".encode())
            sent += len(lines)
            if done or dropped:
                return

    @contextmanager
    def serve(self) -> Iterator[Any]:
        """Run the stub; yields a ``kubernetes.client.ApiClient`` pointed at it."""
        from kubernetes import client

        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: Any) -> None:
                pass

            def _answer(self, method: str) -> None:
                url = urlsplit(self.path)
                query = parse_qs(url.query)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                with stub.changed:
                    stub.requests.append((method, url.path, query))
                    stub.changed.notify_all()
                match = ROUTE.match(url.path)
                if method == "GET" and match and match["sub"] == "log":
                    self._log(match, query)
                    return
                code, payload = stub.handle(method, url.path, query, body)
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _log(self, match: re.Match[str], query: dict[str, list[str]]) -> None:
                pod = stub.get(f"/api/v1/namespaces/{match['ns']}/pods", match["name"])
                if pod is None or pod["status"]["phase"] == "Pending":
                    code = 404 if pod is None else 400
                    data = json.dumps(_status(code, "BadRequest", "waiting to start")).encode()
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()

                def write(data: bytes) -> None:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()

                try:
                    if query.get("follow") == ["true"]:
                        stub.stream_log(match["name"], write)
                    else:
                        for line in stub.logs.get(match["name"], []):
                            write(f"{line}\n".encode())
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:  # the client went away (stop() shut the stream)
                    self.close_connection = True

            def do_GET(self) -> None:
                self._answer("GET")

            def do_POST(self) -> None:
                self._answer("POST")

            def do_DELETE(self) -> None:
                self._answer("DELETE")

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        configuration = client.Configuration()
        configuration.host = f"http://127.0.0.1:{server.server_address[1]}"
        api = client.ApiClient(configuration)
        try:
            yield api
        finally:
            with self.changed:
                self.closed.update(self.logs)
                self.changed.notify_all()
            server.shutdown()
            server.server_close()
            api.close()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason,
            "code": code}  # fmt: skip
