"""The `s3` destination against moto's S3 server with SigV4 checking on, plus status mapping with MockTransport."""

from __future__ import annotations

import base64
import gzip
import hashlib
import re
import socket
import ssl
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio
import trustme
from pydantic import ValidationError
from structlog.testing import capture_logs

import relay
from relay.catalog import load_catalog
from relay.errors import ConfigError
from relay.metrics import REGISTRY
from relay_plugins.s3 import S3Destination, S3Settings
from tests import scripted
from tests.fault_proxy import fault_proxy, s3_error
from tests.helpers import (
    RelayProcess,
    config_dict,
    destination_row,
    entry,
    journal_db,
    journal_entries,
    make_config,
    metric_value,
    running_relay,
    wait_until_sync,
    write_config,
)
from tests.moto_s3 import MotoS3

T0 = datetime(2024, 5, 14, 9, 59, 58, 123456, tzinfo=UTC)


pytestmark = pytest.mark.usefixtures("no_ambient_aws")  # `moto` and `no_ambient_aws`: tests/conftest.py


def make_entries(first_seq: int, count: int, start: datetime = T0, step: float = 1.5) -> list[relay.Entry]:
    """Entries shaped like incident.io's (catalog examples), with their own times and sequence numbers."""
    examples = load_catalog()["entry_types"]
    out = []
    for i in range(count):
        value = dict(examples[(first_seq + i) % len(examples)]["example"])
        when = start + timedelta(seconds=i * step)
        value["occurred_at"] = when.isoformat().replace("+00:00", "Z")
        value["context"] = {**value.get("context", {}), "seq_in_test": str(first_seq + i)}
        out.append(relay.Entry(first_seq + i, orjson.dumps(value), when.timestamp(), value["action"]))
    return out


def make_batch(entries: list[relay.Entry], attributes: dict[str, str] | None = None) -> relay.Batch:
    return relay.Batch("archive", entries[0].seq, entries[-1].seq, entries, attributes or {})


def formed(dest: S3Destination, batch: relay.Batch) -> relay.Batch:
    """The batch as the delivery loop hands it over: with what `describe()` said when it was formed."""
    return make_batch(list(batch.entries), dest.describe(batch))


def destination(tmp_path: Path, cls: type[S3Destination] = S3Destination, **settings: Any) -> S3Destination:
    name = f"s3-{uuid.uuid4().hex[:8]}"
    return cls(relay.Context(name, "destination", tmp_path), S3Settings.model_validate(settings))


def moto_destination(moto: MotoS3, tmp_path: Path, bucket: str, *, endpoint: str | None = None,
                     **settings: Any) -> S3Destination:
    keys = {"access_key_id": moto.relay.id, "secret_access_key": moto.relay.secret}
    return destination(tmp_path, bucket=bucket, endpoint_url=endpoint or moto.endpoint, **{**keys, **settings})


@asynccontextmanager
async def opened(dest: S3Destination) -> AsyncIterator[S3Destination]:
    await dest.open()
    try:
        yield dest
    finally:
        await dest.close()


@contextmanager
def socket_closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 with nothing listening (bound without listen, so nobody else takes it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def metric(dest: S3Destination, name: str) -> float:
    return REGISTRY.get_sample_value(f"audit_relay_{name}", {"destination": dest.name}) or 0.0


# -- against moto -------------------------------------------------------------------------------------------


async def test_objects_land_under_their_keys_with_content_sse_and_checksums(moto: MotoS3, tmp_path: Path) -> None:
    bucket = moto.new_bucket()
    first, second = make_entries(1, 3), make_entries(4, 2, start=T0 + timedelta(minutes=5))
    with fault_proxy(("127.0.0.1", moto.port)) as proxy:  # forwards unchanged; records what was sent
        dest = moto_destination(moto, tmp_path, bucket, endpoint=proxy.url, server_side_encryption="AES256",
                                storage_class="STANDARD_IA")
        async with opened(dest):
            for entries in (first, second):
                assert await dest.send(formed(dest, make_batch(entries))) == relay.Delivered()
        sent = [s for s in proxy.seen if s.method == "PUT"]

    key1 = "audit/dt=2024-05-14/hour=09/00000000000000000001-00000000000000000003.jsonl.gz"
    key2 = "audit/dt=2024-05-14/hour=10/00000000000000000004-00000000000000000005.jsonl.gz"
    objects = moto.objects(bucket)
    assert set(objects) == {key1, key2}  # the first entry's hour, even though the batch runs past 10:00
    assert gzip.decompress(objects[key1]).split(b"\n") == [e.data for e in first] + [b""]
    assert gzip.decompress(objects[key2]).split(b"\n") == [e.data for e in second] + [b""]
    head = moto.s3.head_object(Bucket=bucket, Key=key1)
    assert head["ServerSideEncryption"] == "AES256"
    assert head["StorageClass"] == "STANDARD_IA"
    assert head["ContentType"] == "application/gzip"
    assert head["ETag"].strip('"') == hashlib.md5(objects[key1]).hexdigest()
    for request, key in zip(sent, (key1, key2), strict=True):
        stored = objects[key]
        assert request.headers["content-md5"] == base64.b64encode(hashlib.md5(stored).digest()).decode()
        assert request.headers["x-amz-content-sha256"] == hashlib.sha256(stored).hexdigest()
        assert request.headers["if-none-match"] == "*"
    assert metric(dest, "s3_objects_written_total") == 2
    assert metric(dest, "s3_bytes_written_total") == sum(len(v) for v in objects.values())
    assert metric(dest, "s3_uncompressed_bytes_written_total") == sum(len(e.data) + 1 for e in first + second)
    assert metric(dest, "s3_upload_duration_seconds_count") == 2


async def test_uncompressed_jsonl_and_custom_prefix(moto: MotoS3, tmp_path: Path) -> None:
    bucket = moto.new_bucket()
    dest = moto_destination(moto, tmp_path, bucket, compression="none", prefix="logs/%Y/%j/incident-io-")
    entries = make_entries(10, 4)
    async with opened(dest):
        assert await dest.send(formed(dest, make_batch(entries))) == relay.Delivered()
    key = "logs/2024/135/incident-io-00000000000000000010-00000000000000000013.jsonl"
    objects = moto.objects(bucket)
    assert list(objects) == [key]
    assert objects[key] == b"".join(e.data + b"\n" for e in entries)
    assert moto.s3.head_object(Bucket=bucket, Key=key)["ContentType"] == "application/x-ndjson"


async def test_object_lock_bucket_accepts_the_upload(moto: MotoS3, tmp_path: Path) -> None:
    """Object Lock buckets refuse a PutObject without Content-MD5 (or a checksum)."""
    bucket = moto.new_bucket(object_lock=True)
    dest = moto_destination(moto, tmp_path, bucket)
    async with opened(dest):
        assert await dest.send(formed(dest, make_batch(make_entries(1, 2)))) == relay.Delivered()
    assert len(moto.objects(bucket)) == 1


async def test_reupload_of_an_existing_key_counts_as_delivered_and_changes_nothing(
        moto: MotoS3, tmp_path: Path) -> None:
    bucket = moto.new_bucket()
    dest = moto_destination(moto, tmp_path, bucket)
    batch = formed(dest, make_batch(make_entries(1, 3)))
    async with opened(dest):
        assert await dest.send(batch) == relay.Delivered()
        stored = moto.objects(bucket)
        assert await dest.send(batch) == relay.Delivered()
        # Even different bytes under the same key are refused by S3 (If-None-Match: *), never overwritten.
        other = make_batch(make_entries(100, 1), dict(batch.attributes))
        assert await dest.send(other) == relay.Delivered()
    assert moto.objects(bucket) == stored
    assert metric(dest, "s3_objects_written_total") == 1
    assert metric(dest, "s3_objects_already_present_total") == 2


async def test_a_resumed_batch_goes_to_its_recorded_key_with_its_recorded_compression(
        moto: MotoS3, tmp_path: Path) -> None:
    """After a restart the settings may have changed; the batch still goes where it was meant to go."""
    bucket = moto.new_bucket()
    entries = make_entries(7, 2)
    before = destination(tmp_path, bucket=bucket, compression="none", prefix="old/")
    recorded = before.describe(make_batch(entries))
    assert recorded == {"key": "old/00000000000000000007-00000000000000000008.jsonl", "compression": "none"}
    dest = moto_destination(moto, tmp_path, bucket, compression="gzip", prefix="new/")
    async with opened(dest):
        assert await dest.send(make_batch(entries, recorded)) == relay.Delivered()
    assert moto.objects(bucket) == {recorded["key"]: b"".join(e.data + b"\n" for e in entries)}


async def test_upload_cut_off_after_s3_stored_it_is_delivered_once_on_the_next_attempt(
        moto: MotoS3, tmp_path: Path) -> None:
    """S3 stored the object but the answer never came (timeout, crash): the retry finds it there."""
    bucket = moto.new_bucket()
    with fault_proxy(("127.0.0.1", moto.port), mode="hold") as proxy:
        dest = moto_destination(moto, tmp_path, bucket, endpoint=proxy.url)
        batch = formed(dest, make_batch(make_entries(1, 5)))
        async with opened(dest):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(dest.send, batch)
                assert await trio.to_thread.run_sync(proxy.held.wait, 20.0)
                nursery.cancel_scope.cancel()  # what send_timeout does
            assert len(moto.objects(bucket)) == 1
            proxy.mode = "forward"
            assert await dest.send(batch) == relay.Delivered()
    objects = moto.objects(bucket)
    assert list(objects) == [batch.attributes["key"]]
    assert gzip.decompress(objects[batch.attributes["key"]]).splitlines() == [e.data for e in batch.entries]
    assert metric(dest, "s3_objects_already_present_total") == 1


@pytest.mark.parametrize(("status", "reason", "code", "extra", "after"), [
    (503, "Slow Down", "SlowDown", "Retry-After: 2\r\n", 2.0),
    (500, "Internal Server Error", "InternalError", "", None),
    (400, "Bad Request", "RequestTimeout", "", None),
])
async def test_a_storm_of_transient_errors_is_retried_then_delivered(
        moto: MotoS3, tmp_path: Path, status: int, reason: str, code: str, extra: str, after: float | None) -> None:
    bucket = moto.new_bucket()
    answer = s3_error(status, reason, code, "transient trouble", extra)
    with fault_proxy(("127.0.0.1", moto.port), mode="fail", fail_count=4, fail_response=answer) as proxy:
        dest = moto_destination(moto, tmp_path, bucket, endpoint=proxy.url)
        batch = formed(dest, make_batch(make_entries(1, 3)))
        results = []
        async with opened(dest):
            for _ in range(5):
                results.append(await dest.send(batch))
    for result in results[:4]:
        assert isinstance(result, relay.RetryLater)
        assert f"{status} {code}: transient trouble" in result.reason
        assert result.after == after
    assert results[4] == relay.Delivered()
    assert list(moto.objects(bucket)) == [batch.attributes["key"]]
    assert [s.outcome for s in proxy.seen] == ["fail"] * 4 + ["forward"]


async def test_connection_closed_without_an_answer_is_retried(moto: MotoS3, tmp_path: Path) -> None:
    bucket = moto.new_bucket()
    with fault_proxy(("127.0.0.1", moto.port), mode="drop") as proxy:
        dest = moto_destination(moto, tmp_path, bucket, endpoint=proxy.url)
        async with opened(dest):
            result = await dest.send(formed(dest, make_batch(make_entries(1, 1))))
    assert isinstance(result, relay.RetryLater)
    assert "RemoteProtocolError" in result.reason


async def test_tls_with_a_private_ca_needs_ca_file(moto: MotoS3, tmp_path: Path) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    bucket = moto.new_bucket()
    with fault_proxy(("127.0.0.1", moto.port), tls=server_context) as proxy:
        untrusting = moto_destination(moto, tmp_path, bucket, endpoint=proxy.url)
        async with opened(untrusting):
            refused = await untrusting.send(formed(untrusting, make_batch(make_entries(1, 1))))
        trusting = moto_destination(moto, tmp_path, bucket, endpoint=proxy.url,
                                    tls={"ca_file": str(tmp_path / "ca.pem")})
        async with opened(trusting):
            assert await trusting.send(formed(trusting, make_batch(make_entries(1, 1)))) == relay.Delivered()
            assert bucket in await trusting.check()
    assert isinstance(refused, relay.Halted)
    assert "TLS certificate is not trusted" in refused.reason and "set tls.ca_file" in refused.reason
    assert len(moto.objects(bucket)) == 1


async def test_unreachable_endpoint_is_retried(tmp_path: Path) -> None:
    with socket_closed_port() as port:
        dest = destination(tmp_path, bucket="audit", endpoint_url=f"http://127.0.0.1:{port}",
                           access_key_id="AKIDEXAMPLE", secret_access_key="wJalrXUtnFEMI/K7MDENG")
        async with opened(dest):
            result = await dest.send(formed(dest, make_batch(make_entries(1, 1))))
    assert isinstance(result, relay.RetryLater)
    assert "ConnectError" in result.reason


async def test_wrong_secret_halts_with_signature_does_not_match_and_never_shows_the_secret(
        moto: MotoS3, tmp_path: Path) -> None:
    bucket = moto.new_bucket()
    secret = f"wrong-{uuid.uuid4().hex}-SECRET"
    with capture_logs() as logs:
        dest = moto_destination(moto, tmp_path, bucket, secret_access_key=secret)
        async with opened(dest):
            result = await dest.send(formed(dest, make_batch(make_entries(1, 2))))
            with pytest.raises(relay.CheckFailed) as check:
                await dest.check()
    assert isinstance(result, relay.Halted)
    assert "403 SignatureDoesNotMatch: The request signature we calculated does not match" in result.reason
    assert "SignatureDoesNotMatch" in str(check.value)
    for text in (result.reason, str(check.value), repr(logs), str(dest.settings), repr(dest.settings)):
        assert secret not in text
    assert moto.objects(bucket) == {}


@pytest.mark.parametrize(("who", "code"), [
    ("unknown key", "403 InvalidAccessKeyId"),
    ("no permissions", "403 AccessDenied"),
    ("missing bucket", "404 NoSuchBucket"),
])
async def test_credential_and_bucket_problems_halt_with_the_s3_error(
        moto: MotoS3, tmp_path: Path, who: str, code: str) -> None:
    bucket = moto.new_bucket()
    settings: dict[str, Any] = {
        "unknown key": {"access_key_id": "AKIAUNKNOWNKEY000000"},
        "no permissions": {"access_key_id": moto.nobody.id, "secret_access_key": moto.nobody.secret},
        "missing bucket": {"bucket": f"{bucket}-missing"},
    }[who]
    dest = moto_destination(moto, tmp_path, settings.pop("bucket", bucket), **settings)
    async with opened(dest):
        result = await dest.send(formed(dest, make_batch(make_entries(1, 1))))
    assert isinstance(result, relay.Halted)
    assert code in result.reason


async def test_check_passes_with_good_credentials_and_names_missing_buckets(moto: MotoS3, tmp_path: Path) -> None:
    bucket = moto.new_bucket()
    async with opened(moto_destination(moto, tmp_path, bucket)) as dest:
        assert bucket in await dest.check()
    async with opened(moto_destination(moto, tmp_path, f"{bucket}-missing")) as dest:
        with pytest.raises(relay.CheckFailed, match="NoSuchBucket"):
            await dest.check()
    assert moto.objects(bucket) == {}  # a check writes nothing


# -- the AWS credential chain ------------------------------------------------------------------------------


async def test_credentials_from_the_environment(moto: MotoS3, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto.relay.id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto.relay.secret)
    bucket = moto.new_bucket()
    with capture_logs() as logs:
        dest = destination(tmp_path, bucket=bucket, endpoint_url=moto.endpoint)
        async with opened(dest):
            assert await dest.send(formed(dest, make_batch(make_entries(1, 2)))) == relay.Delivered()
    assert {"event": "s3_credentials_resolved", "method": "env"}.items() <= logs[0].items()
    assert moto.relay.secret not in repr(logs)
    assert len(moto.objects(bucket)) == 1


async def test_credentials_from_a_profile_with_its_region(moto: MotoS3, tmp_path: Path) -> None:
    (tmp_path / "aws-credentials").write_text(
        f"[archive]\naws_access_key_id = {moto.relay.id}\naws_secret_access_key = {moto.relay.secret}\n")
    (tmp_path / "aws-config").write_text("[profile archive]\nregion = eu-west-1\n")
    bucket = moto.new_bucket()
    dest = destination(tmp_path, bucket=bucket, endpoint_url=moto.endpoint, profile="archive")
    async with opened(dest):
        assert await dest.send(formed(dest, make_batch(make_entries(1, 2)))) == relay.Delivered()
        assert dest._region == "eu-west-1"
    assert len(moto.objects(bucket)) == 1


async def test_temporary_credentials_are_refreshed_by_the_chain(moto: MotoS3, tmp_path: Path) -> None:
    """credential_process hands out credentials that expire soon; botocore fetches fresh ones before use."""
    calls = tmp_path / "calls"
    script = tmp_path / "creds.py"
    script.write_text(
        "import json, sys, datetime\n"
        f"open({str(calls)!r}, 'a').write('x')\n"
        "expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=12)\n"
        f"print(json.dumps({{'Version': 1, 'AccessKeyId': {moto.relay.id!r}, "
        f"'SecretAccessKey': {moto.relay.secret!r}, 'Expiration': expires.isoformat()}}))\n")
    (tmp_path / "aws-config").write_text(f"[profile rotating]\ncredential_process = {sys.executable} {script}\n")
    bucket = moto.new_bucket()
    dest = destination(tmp_path, bucket=bucket, endpoint_url=moto.endpoint, profile="rotating")
    async with opened(dest):
        assert await dest.send(formed(dest, make_batch(make_entries(1, 1)))) == relay.Delivered()
        before = len(calls.read_text())
        assert await dest.send(formed(dest, make_batch(make_entries(2, 1)))) == relay.Delivered()
        assert len(calls.read_text()) > before
    assert len(moto.objects(bucket)) == 2


@pytest.mark.parametrize(("profile", "message"), [
    (None, "no AWS credentials found"),
    ("nope", "The config profile (nope) could not be found"),
])
async def test_missing_credentials_halt_with_what_to_do(tmp_path: Path, profile: str | None, message: str) -> None:
    dest = destination(tmp_path, bucket="audit", endpoint_url="http://127.0.0.1:9", profile=profile)
    async with opened(dest):
        result = await dest.send(formed(dest, make_batch(make_entries(1, 1))))
        with pytest.raises(relay.CheckFailed, match=re.escape(message)):
            await dest.check()
    assert isinstance(result, relay.Halted)
    assert message in result.reason


# -- what is sent and how answers map (httpx.MockTransport) ---------------------------------------------------


class Recorder:
    def __init__(self, answer: Callable[[httpx.Request], httpx.Response] | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.answer = answer or (lambda request: httpx.Response(200))

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        return self.answer(request)


def mocked(tmp_path: Path, recorder: Recorder, **settings: Any) -> S3Destination:
    class Mocked(S3Destination):
        def _new_client(self) -> httpx.AsyncClient:
            return httpx.AsyncClient(transport=httpx.MockTransport(recorder))

    base = {"bucket": "audit-archive", "region": "eu-west-1", "access_key_id": "AKIDEXAMPLE",
            "secret_access_key": "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"}
    return destination(tmp_path, Mocked, **{**base, **settings})


async def test_request_headers_checksums_encryption_and_signature(tmp_path: Path) -> None:
    recorder = Recorder()
    dest = mocked(tmp_path, recorder, server_side_encryption="aws:kms", kms_key_id="alias/audit",
                  storage_class="GLACIER_IR", session_token="FwoGZXIvYXdzEXAMPLETOKEN")
    batch = formed(dest, make_batch(make_entries(1, 3)))
    async with opened(dest):
        assert await dest.send(batch) == relay.Delivered()
        assert await dest.send(batch) == relay.Delivered()
    first, again = recorder.requests
    assert first.method == "PUT"
    assert str(first.url) == ("https://audit-archive.s3.eu-west-1.amazonaws.com/"
                              "audit/dt%3D2024-05-14/hour%3D09/00000000000000000001-00000000000000000003.jsonl.gz")
    body = first.content
    assert again.content == body  # deterministic gzip: a re-upload after a crash has the same bytes
    assert body[4:8] == b"\0\0\0\0"  # gzip mtime
    assert gzip.decompress(body).splitlines() == [e.data for e in batch.entries]
    headers = first.headers
    assert headers["content-md5"] == base64.b64encode(hashlib.md5(body).digest()).decode()
    assert headers["x-amz-content-sha256"] == hashlib.sha256(body).hexdigest()
    assert headers["if-none-match"] == "*"
    assert headers["x-amz-server-side-encryption"] == "aws:kms"
    assert headers["x-amz-server-side-encryption-aws-kms-key-id"] == "alias/audit"
    assert headers["x-amz-storage-class"] == "GLACIER_IR"
    assert headers["x-amz-security-token"] == "FwoGZXIvYXdzEXAMPLETOKEN"
    authorization = headers["authorization"]
    assert authorization.startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    assert "/eu-west-1/s3/aws4_request" in authorization
    signed = authorization.split("SignedHeaders=")[1].split(",")[0].split(";")
    for name in ("content-md5", "host", "if-none-match", "x-amz-content-sha256", "x-amz-date",
                 "x-amz-security-token", "x-amz-server-side-encryption",
                 "x-amz-server-side-encryption-aws-kms-key-id", "x-amz-storage-class"):
        assert name in signed


@pytest.mark.parametrize(("settings", "bucket_url"), [
    ({}, "https://audit-archive.s3.eu-west-1.amazonaws.com/"),
    ({"bucket": "audit.example.com"}, "https://s3.eu-west-1.amazonaws.com/audit.example.com"),
    ({"region": "cn-north-1"}, "https://audit-archive.s3.cn-north-1.amazonaws.com.cn/"),
    ({"path_style": True}, "https://s3.eu-west-1.amazonaws.com/audit-archive"),
    ({"endpoint_url": "https://minio.internal:9000/"}, "https://minio.internal:9000/audit-archive"),
    ({"endpoint_url": "https://r2.example.net", "path_style": False}, "https://audit-archive.r2.example.net/"),
])
async def test_addressing(tmp_path: Path, settings: dict[str, Any], bucket_url: str) -> None:
    """Objects and the bucket (HeadBucket), path-style or on a virtual host; never an empty path."""
    recorder = Recorder()
    dest = mocked(tmp_path, recorder, **settings)
    async with opened(dest):
        await dest.send(make_batch(make_entries(1, 1), {"key": "dt=1/k"}))
        await dest.check()
    put, head = recorder.requests
    assert str(put.url) == f"{bucket_url.rstrip('/')}/dt%3D1/k"
    assert (head.method, str(head.url)) == ("HEAD", bucket_url)


def xml_error(status: int, code: str, message: str = "msg", headers: dict[str, str] | None = None,
              **fields: str) -> Callable[[httpx.Request], httpx.Response]:
    extra = "".join(f"<{k}>{v}</{k}>" for k, v in fields.items())
    body = f"<Error><Code>{code}</Code><Message>{message}</Message>{extra}<RequestId>R1</RequestId></Error>"
    return lambda request: httpx.Response(status, headers=headers, content=body.encode())


@pytest.mark.parametrize(("answer", "kind", "text"), [
    (xml_error(412, "PreconditionFailed"), relay.Delivered, None),
    (xml_error(503, "SlowDown", "Please reduce your request rate.", {"Retry-After": "7"}),
     relay.RetryLater, "503 SlowDown: Please reduce your request rate. (request id R1)"),
    (xml_error(500, "InternalError"), relay.RetryLater, "500 InternalError"),
    (xml_error(400, "RequestTimeout"), relay.RetryLater, "400 RequestTimeout"),
    (xml_error(409, "ConditionalRequestConflict"), relay.RetryLater, "409 ConditionalRequestConflict"),
    (xml_error(400, "KMS.ThrottlingException"), relay.RetryLater, "KMS.ThrottlingException"),
    (lambda r: httpx.Response(429), relay.RetryLater, "429 Too Many Requests"),
    (lambda r: httpx.Response(502, content=b"<html>\n<b>Bad gateway</b>\n</html>"), relay.RetryLater, "502"),
    (lambda r: httpx.Response(504, content=b"upstream timed out\n"), relay.RetryLater,
     "504 Gateway Timeout: upstream timed out"),
    (xml_error(403, "AccessDenied", "Access Denied"), relay.Halted, "403 AccessDenied: Access Denied"),
    (xml_error(403, "InvalidAccessKeyId"), relay.Halted, "403 InvalidAccessKeyId"),
    (xml_error(404, "NoSuchBucket", "The specified bucket does not exist"), relay.Halted, "404 NoSuchBucket"),
    (xml_error(400, "KMS.NotFoundException", "Invalid keyId alias/audit"), relay.Halted,
     "400 KMS.NotFoundException: Invalid keyId alias/audit"),
    (xml_error(403, "KMS.DisabledException"), relay.Halted, "KMS.DisabledException"),
    (xml_error(400, "InvalidStorageClass"), relay.Halted, "InvalidStorageClass"),
    (xml_error(403, "RequestTimeTooSkewed", ServerTime="2024-05-14T10:00:00Z"), relay.Halted,
     "clock is more than 15 minutes off S3's (S3's time: 2024-05-14T10:00:00Z)"),
    (xml_error(400, "AuthorizationHeaderMalformed", Region="us-west-2"), relay.Halted, "set region: us-west-2"),
    (xml_error(301, "PermanentRedirect", headers={"x-amz-bucket-region": "ap-south-1"}), relay.Halted,
     "set region: ap-south-1"),
])
async def test_answers_map_to_results(tmp_path: Path, answer: Callable[[httpx.Request], httpx.Response],
                                      kind: type, text: str | None) -> None:
    dest = mocked(tmp_path, Recorder(answer))
    async with opened(dest):
        result = await dest.send(formed(dest, make_batch(make_entries(1, 2))))
    assert isinstance(result, kind)
    if text is not None:
        assert isinstance(result, relay.RetryLater | relay.Halted)
        assert text in result.reason
        assert "PutObject s3://audit-archive/audit/dt=2024-05-14/hour=09/" in result.reason
    if isinstance(result, relay.RetryLater):
        assert result.after == (7.0 if "SlowDown" in result.reason else None)


async def test_expired_session_token_halts_when_configured_and_retries_through_the_chain(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expired = xml_error(400, "ExpiredToken", "The provided token has expired.")
    dest = mocked(tmp_path, Recorder(expired), session_token="FwoGZXIvYXdzEXAMPLETOKEN")
    async with opened(dest):
        result = await dest.send(formed(dest, make_batch(make_entries(1, 1))))
    assert isinstance(result, relay.Halted)
    assert "session_token has expired" in result.reason

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ASIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "chain-secret-value")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "chain-token")
    recorder = Recorder(expired)
    dest = mocked(tmp_path, recorder, access_key_id=None, secret_access_key=None)
    async with opened(dest):
        result = await dest.send(formed(dest, make_batch(make_entries(1, 1))))
    assert isinstance(result, relay.RetryLater)
    assert recorder.requests[0].headers["x-amz-security-token"] == "chain-token"


# -- settings ------------------------------------------------------------------------------------------------


def test_batch_defaults_suit_archives() -> None:
    assert S3Destination.batch_defaults == relay.BatchDefaults(
        max_entries=50_000, max_bytes=10 * 1024 * 1024, max_wait=300.0)


@pytest.mark.parametrize(("settings", "message"), [
    ({"access_key_id": "AKIDEXAMPLE"}, "access_key_id and secret_access_key go together"),
    ({"secret_access_key": "s3cr3t-value"}, "access_key_id and secret_access_key go together"),
    ({"session_token": "token-value"}, "session_token needs access_key_id"),
    ({"profile": "p", "access_key_id": "AKIDEXAMPLE", "secret_access_key": "s3cr3t-value"}, "either profile"),
    ({"kms_key_id": "alias/x"}, "kms_key_id needs server_side_encryption: aws:kms"),
    ({"server_side_encryption": "aws:kms:dsse"}, "Input should be 'AES256' or 'aws:kms'"),
    ({"prefix": "/audit/"}, "must not start with '/'"),
    ({"prefix": "audit/%Q/"}, "unsupported strftime directive %Q"),
    ({"prefix": "a" * 1000}, "too long"),
    ({"endpoint_url": "minio:9000"}, "must be http(s)://host[:port]"),
    ({"storage_class": "standard_ia"}, "String should match pattern"),
    ({"compression": "zstd"}, "Input should be 'gzip' or 'none'"),
    ({"bucket": "a/b"}, "String should match pattern"),
])
def test_invalid_settings_are_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        S3Settings.model_validate({"bucket": "audit", **settings})


def test_secrets_are_masked_in_settings() -> None:
    settings = S3Settings.model_validate({"bucket": "audit", "access_key_id": "AKIDEXAMPLE",
                                          "secret_access_key": "very-secret-value"})
    assert "very-secret-value" not in repr(settings)
    assert "very-secret-value" not in settings.model_dump_json()


# -- through the whole relay ---------------------------------------------------------------------------------


def s3_config(moto: MotoS3, bucket: str, endpoint: str, **extra: Any) -> dict[str, Any]:
    return {"type": "s3", "bucket": bucket, "endpoint_url": endpoint, "access_key_id": moto.relay.id,
            "secret_access_key": moto.relay.secret, **extra}


def seqs_of(key: str) -> list[int]:
    """The journal sequence numbers an object's key names: `<prefix><first>-<last>.jsonl.gz`."""
    first, last = (int(n) for n in key.rsplit("/", 1)[1].removesuffix(".jsonl.gz").split("-"))
    return list(range(first, last + 1))


def lines_by_key(moto: MotoS3, bucket: str) -> dict[str, list[bytes]]:
    return {key: gzip.decompress(body).splitlines() for key, body in moto.objects(bucket).items()}


async def test_relay_rides_out_a_503_storm_and_delivers_every_entry_once(moto: MotoS3, tmp_path: Path) -> None:
    bucket = moto.new_bucket()
    storm = s3_error(503, "Slow Down", "SlowDown", "Please reduce your request rate.")
    with fault_proxy(("127.0.0.1", moto.port), mode="fail", fail_count=6, fail_response=storm) as proxy:
        config = make_config(config_dict(tmp_path, {"in": {"type": "manual"}}, {"archive": s3_config(
            moto, bucket, proxy.url, batch={"max_entries": 20, "max_bytes": "2KiB", "max_wait": "10ms"},
            retry={"initial_backoff": "10ms", "max_backoff": "50ms"})}), extra=[scripted])
        submitted = [entry(occurred_at=f"2024-05-14T09:30:{i:02d}.000000Z", n=i) for i in range(60)]
        async with running_relay(config) as service:
            assert (await service.sources["in"].intake.submit(submitted)).accepted == 60
            with trio.fail_after(30):
                await service.destinations["archive"].loop.wait_offset(60)
    objects = lines_by_key(moto, bucket)
    delivered = [orjson.loads(line)["n"] for key in sorted(objects) for line in objects[key]]
    assert delivered == list(range(60))
    assert len(objects) > 3, "the byte limit cut batches short of max_entries"
    for key, lines in objects.items():
        assert len(lines) == len(seqs_of(key)), f"{key} names the range of entries it holds"
    assert [s.outcome for s in proxy.seen].count("fail") == 6
    assert proxy.count("PUT") == 6 + len(objects)
    assert metric_value("audit_relay_destination_retries_total", destination="archive", outcome="retry") >= 6


def test_kill_9_during_upload_then_restart_same_keys_no_duplicate_no_gap(moto: MotoS3, tmp_path: Path) -> None:
    """Kill the relay while uploads are in flight: one already stored by S3, others never arrived."""
    bucket = moto.new_bucket()
    state = tmp_path / "state"
    total = 2000
    with fault_proxy(("127.0.0.1", moto.port), mode="hold", hold_forwarded=1) as proxy:
        config = write_config(tmp_path / "relay.yaml", config_dict(
            tmp_path, sources={"demo": {"type": "demo", "rate": 20000, "count": total}},
            destinations={"archive": {
                **s3_config(moto, bucket, proxy.url, concurrency=4, batch={"max_entries": 250, "max_wait": "100ms"}),
                "access_key_id": "${TEST_S3_KEY_ID}", "secret_access_key": "${TEST_S3_SECRET}"}}))
        relay_process = RelayProcess(config, tmp_path / "relay.log",
                                     env={"TEST_S3_KEY_ID": moto.relay.id, "TEST_S3_SECRET": moto.relay.secret})
        try:
            relay_process.start()
            wait_until_sync(lambda: proxy.held.is_set() and proxy.count("PUT") >= 4, 30, "4 uploads in flight")
            relay_process.kill()
            before = moto.objects(bucket)
            with journal_db(state) as db:
                recorded = {orjson.loads(row[0])["key"]
                            for row in db.execute("SELECT attributes FROM pending WHERE done = 0")}
            assert len(before) == 1, "exactly the one upload the proxy let through was stored"
            assert set(before) <= recorded and len(recorded) >= 4

            proxy.mode = "forward"
            relay_process.start()

            def caught_up() -> bool:
                row = destination_row(state, "archive")
                return len(journal_entries(state)) == total and row.get("offset") == journal_entries(state)[-1][0]

            wait_until_sync(caught_up, 60, "every entry produced and delivered")
            assert relay_process.terminate() == 0
        finally:
            relay_process.stop_quietly()

    after = moto.objects(bucket)
    assert after.items() >= before.items(), "the object stored before the kill is untouched"
    assert recorded <= set(after), "resumed batches went to the keys recorded before the kill"
    journaled = dict(journal_entries(state))
    covered: list[int] = []
    for key, body in sorted(after.items()):
        seqs = seqs_of(key)
        assert gzip.decompress(body).splitlines() == [journaled[s] for s in seqs], f"{key}: its range, in order"
        covered.extend(seqs)
    assert covered == sorted(journaled), "every journaled entry in exactly one object: no gap, no duplicate"
    events = relay_process.events()
    present = [e["key"] for e in events if e.get("event") == "s3_object_already_present"]
    assert present == list(before)
    assert sum(1 for e in events if e.get("event") == "batch_resumed") == len(recorded)
    assert moto.relay.secret not in relay_process.log_text()


def test_config_errors_name_the_destination(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        make_config(config_dict(tmp_path, destinations={"archive": {
            "type": "s3", "bucket": "audit", "kms_key_id": "alias/audit", "secret_access_key": "s3cr3t-value"}}))
    text = str(error.value)
    assert "destinations.archive" in text
    assert "access_key_id and secret_access_key go together" in text
    assert "s3cr3t-value" not in text
