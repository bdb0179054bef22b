"""A moto S3 server run as a subprocess on 127.0.0.1, for tests and benchmarks.

Only loopback addresses are used: the server binds 127.0.0.1 and every client
talks to ``http://127.0.0.1:<port>``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

# Never let a client look for credentials on an instance-metadata address.
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _server_argv(port: int) -> list[str]:
    exe = Path(sys.executable).with_name("moto_server")
    if exe.exists():
        return [str(exe), "-H", "127.0.0.1", "-p", str(port)]
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


class MotoServer:
    """``with MotoServer() as srv: srv.endpoint`` -> ``http://127.0.0.1:PORT``.

    ``auth=True`` starts moto with IAM checks on (``INITIAL_NO_AUTH_ACTION_COUNT``):
    :meth:`create_credentials` then makes a user with full access and returns its key
    pair, and any other key pair is refused with 403 (moto accepts any credentials
    otherwise).
    """

    def __init__(self, port: int | None = None, *, auth: bool = False, env: Mapping[str, str] | None = None) -> None:
        self.port = port or free_port()
        self.auth = auth
        self._env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> MotoServer:
        env = dict(os.environ)
        # Keep object bodies in memory: moto spools bodies over ~5 MiB to temp files and
        # copies the whole body for every ranged GET, which would time moto's disk.
        env.setdefault("MOTO_S3_DEFAULT_KEY_BUFFER_SIZE", str(1 << 30))
        env.update(self._env)
        if self.auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"
        self.proc = subprocess.Popen(
            _server_argv(self.port),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with status {self.proc.returncode} on port {self.port}")
            if self._answers():
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"moto server did not answer on {self.endpoint} within {timeout} s")

    def _answers(self) -> bool:
        # /moto-api/ is moto's own endpoint: it answers without counting as an AWS action.
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1.0)
        try:
            conn.request("GET", "/moto-api/data.json")
            conn.getresponse().read()
            return True
        except OSError:
            return False
        finally:
            conn.close()

    def reset(self) -> None:
        """Drop every bucket and object (moto's reset endpoint)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10.0)
        try:
            conn.request("POST", "/moto-api/reset")
            conn.getresponse().read()
        finally:
            conn.close()

    def create_credentials(self) -> tuple[str, str]:
        """With ``auth=True``: an IAM user allowed everything; its (access key id, secret)."""
        import boto3

        iam = boto3.client(
            "iam",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",
        )
        try:
            iam.create_user(UserName="cas-test")
            policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
            iam.put_user_policy(UserName="cas-test", PolicyName="all", PolicyDocument=json.dumps(policy))
            key = iam.create_access_key(UserName="cas-test")["AccessKey"]
        finally:
            iam.close()
        return key["AccessKeyId"], key["SecretAccessKey"]

    def kill(self) -> None:
        """SIGKILL the server (and anything it started) and reap it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    stop = kill

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
