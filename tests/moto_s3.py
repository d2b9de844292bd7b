"""moto's S3 server as a real S3 peer for tests and benchmarks: a subprocess on 127.0.0.1, SigV4 checked.

While moto's auth is still off, three IAM users are made: `relay` with the minimal policy documented in
docs/s3.md, `auditor` with full S3 access (for the tests' own reads and bucket set-up) and `nobody` with no
policy. Then signature and permission checking is switched on for every later request.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx

from tests.helpers import free_port

RELAY_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {"Effect": "Allow", "Action": "s3:PutObject", "Resource": "arn:aws:s3:::*/*"},
        # HeadBucket (relay check --connect) is authorised as s3:ListBucket by AWS; moto names it s3:HeadBucket.
        {"Effect": "Allow", "Action": ["s3:ListBucket", "s3:HeadBucket"], "Resource": "arn:aws:s3:::*"},
    ],
}
FULL_POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}


@dataclass(frozen=True)
class AccessKey:
    id: str
    secret: str


class MotoS3:
    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.relay = AccessKey("", "")
        self.auditor = AccessKey("", "")
        self.nobody = AccessKey("", "")

    def start(self, timeout: float = 30.0) -> MotoS3:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while True:  # an external process: poll until it answers
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}: {self.log_path.read_text()}")
            try:
                httpx.get(f"{self.endpoint}/moto-api/", timeout=1.0)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.05)
        iam = self._client("iam", AccessKey("setup", "setup"))
        self.relay = self._user(iam, "relay", RELAY_POLICY)
        self.auditor = self._user(iam, "auditor", FULL_POLICY)
        self.nobody = self._user(iam, "nobody", None)
        answer = httpx.post(f"{self.endpoint}/moto-api/reset-auth", content=b"0")
        answer.raise_for_status()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def _client(self, service: str, key: AccessKey) -> Any:
        return boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=key.id, aws_secret_access_key=key.secret)

    @staticmethod
    def _user(iam: Any, name: str, policy: dict[str, Any] | None) -> AccessKey:
        iam.create_user(UserName=name)
        if policy is not None:
            iam.put_user_policy(UserName=name, PolicyName=f"{name}-policy", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return AccessKey(key["AccessKeyId"], key["SecretAccessKey"])

    @property
    def s3(self) -> Any:
        """A boto3 S3 client with the auditor's full access, for set-up and assertions."""
        return self._client("s3", self.auditor)

    def new_bucket(self, *, object_lock: bool = False) -> str:
        name = f"audit-{uuid.uuid4().hex[:12]}"
        self.s3.create_bucket(Bucket=name, ObjectLockEnabledForBucket=object_lock)
        return name

    def objects(self, bucket: str) -> dict[str, bytes]:
        """Every object in the bucket, key -> stored bytes."""
        s3 = self.s3
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        return {key: s3.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}
