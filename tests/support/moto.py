"""A real moto server (``moto_server``), spoken to over HTTP the way AWS is.

One class for every test that needs AWS APIs: the session's server behind the ``moto_*``
fixtures (tests/conftest.py), and servers a test owns (a Secrets Manager endpoint that goes
down and comes back on the same port, one inside a gang's network namespace).
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.support.ports import LOOPBACK

REGION = "us-east-1"
# moto accepts any credentials; these keep boto3 and the AWS CLI from looking for real ones.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


class MotoServer:
    """A moto server on host:port; stop/start keep the port, so an endpoint a node was given
    can go down and come back. With ``netns`` it runs inside that network namespace (a gang's
    private network), and so do its readiness check and put_secret."""

    def __init__(self, port: int, log_path: Path, host: str = LOOPBACK, netns: str | None = None) -> None:
        self.port = port
        self.host = host
        self.netns = netns
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _in_netns(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    def start(self, timeout_s: float = 60) -> None:
        """Start it and wait until its API answers (moto's own /moto-api/ page)."""
        moto = Path(sys.executable).parent / "moto_server"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self._in_netns([str(moto), "-H", self.host, "-p", str(self.port)]),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while not self._answers():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"moto_server exited with {self.process.returncode}: {self.log_path.read_text()[-2000:]}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto_server on {self.endpoint} not answering after {timeout_s:.0f} s")
            time.sleep(0.3)

    def _answers(self) -> bool:
        url = f"{self.endpoint}/moto-api/"
        if self.netns:  # only a process inside the namespace reaches it
            probe = f"import urllib.request; urllib.request.urlopen({url!r}, timeout=2).close()"
            probed = subprocess.run(self._in_netns([sys.executable, "-c", probe]), check=False, capture_output=True)
            return probed.returncode == 0
        try:
            urllib.request.urlopen(url, timeout=2).close()
        except OSError:
            return False
        return True

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)
        self.process = None

    def reset(self) -> None:
        """Forget every resource (moto's reset API): the next test starts from an empty account."""
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def put_secret(self, secret_id: str, value: str, region: str) -> None:
        """Create (or update) the secret; the value goes over stdin, never into an argv."""
        script = (
            "import sys, boto3\n"
            "endpoint, region, secret_id = sys.argv[1:4]\n"
            "client = boto3.client('secretsmanager', endpoint_url=endpoint, region_name=region,\n"
            "                      aws_access_key_id='testing', aws_secret_access_key='testing')\n"
            "value = sys.stdin.read()\n"
            "try:\n"
            "    client.create_secret(Name=secret_id, SecretString=value)\n"
            "except client.exceptions.ResourceExistsException:\n"
            "    client.put_secret_value(SecretId=secret_id, SecretString=value)\n"
        )
        subprocess.run(
            self._in_netns([sys.executable, "-c", script, self.endpoint, region, secret_id]),
            input=value, text=True, check=True, capture_output=True, timeout=60,
        )  # fmt: skip
