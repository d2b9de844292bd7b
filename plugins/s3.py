"""Destination `s3`: each batch becomes one object in Amazon S3 (or an S3-compatible store), created once.

The object key is chosen when the batch is formed (the prefix formatted with the first entry's time, then the
batch's journal range) and recorded in the journal with the batch, so after a crash the same entries go to the
same key. Uploads carry `If-None-Match: *`: S3 refuses to create the object twice, and that refusal (412) means
an earlier attempt already stored it, so it counts as delivered. S3 writes are atomic, so a key holds either
nothing or a complete batch.

Metrics (each labelled with the destination name):
    audit_relay_s3_objects_written_total            objects created
    audit_relay_s3_objects_already_present_total    uploads answered 412: an earlier attempt had stored the object
    audit_relay_s3_bytes_written_total              bytes stored (after compression)
    audit_relay_s3_uncompressed_bytes_written_total bytes of JSON lines stored, before compression
    audit_relay_s3_upload_duration_seconds          one PUT, from sending the request to the answer
Logs: `s3_credentials_resolved` (info: where the credentials came from, never their value),
`s3_object_already_present` (info), `s3_object_written` (debug).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Self
from urllib.parse import quote
from xml.etree import ElementTree

import httpx
import trio
from pydantic import Field, field_validator, model_validator

import relay
from relay.http_client import AsyncClient
from relay.retry import parse_retry_after
from relay.tls import untrusted_certificate

if TYPE_CHECKING:
    from botocore.credentials import Credentials, ReadOnlyCredentials

# botocore (credentials and signing) is imported where it is used, when an s3 destination opens: it takes
# ~110 ms to import, a fifth of the relay's start, which every relay without an s3 destination would pay.

__all__ = ["S3Destination", "S3Settings"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_PREFIX_DIRECTIVES = set("YmdHMSjyGVuUWaAbBpzZ%")
_MAX_KEY_BYTES = 1024
_KEY_TAIL = len("00000000000000000000-00000000000000000000.jsonl.gz")

_RETRY_CODES = frozenset({
    "SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "ConditionalRequestConflict",
    "OperationAborted", "BadDigest", "XAmzContentSHA256Mismatch", "IncompleteBody", "RequestTimeoutException",
    "KMS.ThrottlingException", "KMS.KMSInternalException", "KMS.DependencyTimeoutException",
    "KMS.LimitExceededException",
})
"""Error codes that say "try again"; every other 4xx code needs someone to change something."""
_REGION_CODES = frozenset({"PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"})


class TlsSettings(relay.Settings):
    verify: bool = True
    """Check the store's certificate and host name. Turn off only for a test store."""
    ca_file: Path | None = None
    """PEM bundle to trust instead of the system's, for a store with a private CA."""


class S3Settings(relay.Settings):
    bucket: str = Field(min_length=3, max_length=255, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    region: str | None = Field(default=None, pattern=r"^[a-z0-9-]+$")
    """Default: the AWS configuration's region (AWS_REGION, the profile), else us-east-1."""
    endpoint_url: str | None = None
    """For S3-compatible stores (MinIO, Ceph, R2...): `https://host[:port]`. Default: AWS for `region`."""
    path_style: bool | None = None
    """`https://host/bucket/key` instead of `https://bucket.host/key`. Default: on with `endpoint_url`, or
    for bucket names with dots (they break TLS on virtual hosts); off otherwise."""
    prefix: str = "audit/dt=%Y-%m-%d/hour=%H/"
    """strftime template, formatted with the batch's first entry's `occurred_at` in UTC."""
    compression: Literal["gzip", "none"] = "gzip"
    format: Literal["jsonl"] = "jsonl"
    """One entry per line, exactly as journaled."""
    server_side_encryption: Literal["AES256", "aws:kms"] | None = None
    kms_key_id: str | None = None
    """With `aws:kms`: key id, ARN or alias; default the account's `aws/s3` key."""
    storage_class: str | None = Field(default=None, pattern=r"^[A-Z][A-Z0-9_]*$")
    """e.g. STANDARD_IA, GLACIER_IR; default the bucket's (STANDARD)."""
    access_key_id: relay.Secret | None = None
    secret_access_key: relay.Secret | None = None
    session_token: relay.Secret | None = None
    profile: str | None = None
    """A profile of the shared AWS files, for the credential chain (like AWS_PROFILE)."""
    tls: TlsSettings = TlsSettings()

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            url = httpx.URL(value)
        except httpx.InvalidURL as exc:
            raise ValueError(f"not a URL: {exc}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("must be http(s)://host[:port], e.g. https://minio.example.com:9000")
        if url.query or url.fragment:
            raise ValueError("must not have a query or a fragment")
        return value.rstrip("/")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if value.startswith("/"):
            raise ValueError("must not start with '/' (S3 keys have no leading slash)")
        if any(ord(c) < 32 for c in value):
            raise ValueError("must not contain control characters")
        i = 0
        while (i := value.find("%", i)) >= 0:
            directive = value[i + 1:i + 2]
            if directive not in _PREFIX_DIRECTIVES:
                raise ValueError(f"unsupported strftime directive %{directive} (use e.g. %Y %m %d %H, or %% for %)")
            i += 2
        sample = datetime(2024, 12, 31, 23, 59, 59, tzinfo=UTC).strftime(value)
        if len(sample.encode()) + _KEY_TAIL > _MAX_KEY_BYTES:
            raise ValueError(f"is too long: object keys are limited to {_MAX_KEY_BYTES} bytes")
        return value

    @model_validator(mode="after")
    def _together(self) -> Self:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("access_key_id and secret_access_key go together: set both, or neither to use "
                             "the AWS credential chain")
        if self.session_token is not None and self.access_key_id is None:
            raise ValueError("session_token needs access_key_id and secret_access_key")
        if self.profile is not None and self.access_key_id is not None:
            raise ValueError("set either profile or access_key_id/secret_access_key, not both")
        if self.kms_key_id is not None and self.server_side_encryption != "aws:kms":
            raise ValueError("kms_key_id needs server_side_encryption: aws:kms")
        return self


@dataclass(frozen=True)
class _Upload:
    url: str
    headers: dict[str, str]
    body: bytes
    uncompressed: int


class _CredentialsUnavailable(Exception):
    def __init__(self, reason: str, permanent: bool) -> None:
        super().__init__(reason)
        self.permanent = permanent


class S3Destination(relay.Destination):
    type_name = "s3"
    Settings = S3Settings
    batch_defaults = relay.BatchDefaults(max_entries=50_000, max_bytes=10 * 1024 * 1024, max_wait=300.0)
    concurrency_default = 4
    settings: S3Settings

    _client: httpx.AsyncClient | None = None
    _credentials: Credentials | None = None
    _region = "us-east-1"
    _base = ""

    def __init__(self, context: relay.Context, settings: S3Settings) -> None:
        super().__init__(context, settings)
        self._m_objects = context.counter("s3_objects_written_total", "Objects created in S3.")
        self._m_present = context.counter(
            "s3_objects_already_present_total",
            "Uploads answered 412: an earlier attempt (before a crash or timeout) had stored the object.")
        self._m_bytes = context.counter("s3_bytes_written_total", "Bytes stored in S3 (after compression).")
        self._m_raw = context.counter("s3_uncompressed_bytes_written_total",
                                      "Bytes of JSON lines stored in S3, before compression.")
        self._m_duration = context.histogram(
            "s3_upload_duration_seconds", "Duration of one PutObject request.",
            buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))

    # -- lifecycle --------------------------------------------------------------------------------------

    async def open(self) -> None:
        self._region = await trio.to_thread.run_sync(self._resolve_region)
        self._base = self._endpoint_base()
        self._client = self._new_client()

    def _new_client(self) -> AsyncClient:
        verify: ssl.SSLContext | bool = self.settings.tls.verify
        if verify and self.settings.tls.ca_file is not None:
            verify = ssl.create_default_context(cafile=str(self.settings.tls.ca_file))
        return AsyncClient(
            timeout=httpx.Timeout(None, connect=10.0), verify=verify, follow_redirects=False,
            headers={"User-Agent": f"audit-relay/{relay.__version__}"})

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def _resolve_region(self) -> str:
        if self.settings.region:
            return self.settings.region
        import botocore.exceptions
        import botocore.session
        try:
            region = botocore.session.Session(profile=self.settings.profile).get_config_variable("region")
        except botocore.exceptions.BotoCoreError:
            region = None  # a missing profile is reported when credentials are resolved
        return str(region) if region else "us-east-1"

    def _endpoint_base(self) -> str:
        """`scheme://host[:port][/path]` that object paths are appended to, with the bucket placed."""
        bucket, region = self.settings.bucket, self._region
        endpoint = self.settings.endpoint_url
        if endpoint is None:
            suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
            endpoint = f"https://s3.{region}.{suffix}"
        if self._path_style:
            return f"{endpoint}/{quote(bucket, safe='')}"
        url = httpx.URL(endpoint)
        return str(url.copy_with(host=f"{bucket}.{url.host}")).rstrip("/")

    @property
    def _bucket_url(self) -> str:
        """The bucket itself: `/bucket` path-style, `/` on a virtual host (an empty path would sign wrongly)."""
        return self._base if self._path_style else f"{self._base}/"

    @property
    def _path_style(self) -> bool:
        if self.settings.path_style is not None:
            return self.settings.path_style
        return self.settings.endpoint_url is not None or "." in self.settings.bucket

    # -- credentials --------------------------------------------------------------------------------------

    def _frozen_credentials(self) -> ReadOnlyCredentials:
        """Current credentials, refreshed by botocore when temporary ones near expiry. Blocking: use a thread."""
        import botocore.exceptions
        import botocore.session
        from botocore.credentials import Credentials

        settings = self.settings
        if self._credentials is None:
            if settings.access_key_id is not None and settings.secret_access_key is not None:
                self._credentials = Credentials(
                    settings.access_key_id.reveal(), settings.secret_access_key.reveal(),
                    settings.session_token.reveal() if settings.session_token else None, method="explicit")
            else:
                try:
                    found = botocore.session.Session(profile=settings.profile).get_credentials()
                except (botocore.exceptions.ProfileNotFound, botocore.exceptions.PartialCredentialsError,
                        botocore.exceptions.InvalidConfigError, botocore.exceptions.UnknownCredentialError,
                        botocore.exceptions.NoCredentialsError) as exc:
                    raise _CredentialsUnavailable(f"AWS credential chain: {exc}", permanent=True) from None
                except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                    raise _CredentialsUnavailable(f"AWS credential chain: {exc}", permanent=False) from None
                if found is None:
                    raise _CredentialsUnavailable(
                        "no AWS credentials found: set access_key_id and secret_access_key, or provide them "
                        "through the AWS chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws/credentials "
                        "and AWS_PROFILE, web identity, a container or instance role)", permanent=True)
                self._credentials = found
            self.log.info("s3_credentials_resolved", method=self._credentials.method)
        try:
            return self._credentials.get_frozen_credentials()
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise _CredentialsUnavailable(f"refreshing AWS credentials: {exc}", permanent=False) from None

    def _sign(self, method: str, url: str, headers: dict[str, str], body: bytes) -> dict[str, str]:
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.config import Config

        request = AWSRequest(method=method, url=url, headers=headers, data=body)
        # Always sign the body (a real SHA-256 in `x-amz-content-sha256`), also over HTTPS.
        request.context["client_config"] = Config(s3={"payload_signing_enabled": True})
        S3SigV4Auth(self._frozen_credentials(), "s3", self._region).add_auth(request)
        return dict(request.headers.items())

    # -- delivery -----------------------------------------------------------------------------------------

    def object_key(self, batch: relay.Batch) -> str:
        """Prefix from the first entry's time (UTC), then the batch's journal range: stable for the batch."""
        when = _EPOCH + timedelta(seconds=batch.entries[0].occurred_at)
        suffix = ".jsonl.gz" if self.settings.compression == "gzip" else ".jsonl"
        return f"{when.strftime(self.settings.prefix)}{batch.id}{suffix}"

    def describe(self, batch: relay.Batch) -> dict[str, str]:
        return {"key": self.object_key(batch), "compression": self.settings.compression}

    def _prepare(self, batch: relay.Batch, key: str, compression: str) -> _Upload:
        """Body, checksums and signature (blocking: compression and hashing of up to tens of MiB)."""
        raw = b"".join(entry.data + b"\n" for entry in batch.entries)
        if compression == "gzip":
            body = gzip.compress(raw, compresslevel=6, mtime=0)  # same bytes for the same batch, every time
            content_type = "application/gzip"
        else:
            body, content_type = raw, "application/x-ndjson"
        headers = {
            "Content-Type": content_type,
            "Content-MD5": base64.b64encode(hashlib.md5(body).digest()).decode(),
            "If-None-Match": "*",
        }
        settings = self.settings
        if settings.server_side_encryption:
            headers["x-amz-server-side-encryption"] = settings.server_side_encryption
        if settings.kms_key_id:
            headers["x-amz-server-side-encryption-aws-kms-key-id"] = settings.kms_key_id
        if settings.storage_class:
            headers["x-amz-storage-class"] = settings.storage_class
        url = f"{self._base}/{quote(key, safe='/')}"
        return _Upload(url, self._sign("PUT", url, headers, body), body, len(raw))

    async def send(self, batch: relay.Batch) -> relay.Result:
        assert self._client is not None, "send() before open()"
        key = batch.attributes.get("key") or self.object_key(batch)
        compression = batch.attributes.get("compression", self.settings.compression)
        where = f"PutObject s3://{self.settings.bucket}/{key}"
        try:
            upload = await trio.to_thread.run_sync(self._prepare, batch, key, compression)
        except _CredentialsUnavailable as exc:
            return relay.Halted(str(exc)) if exc.permanent else relay.RetryLater(str(exc))
        started = time.perf_counter()
        try:
            response = await self._client.put(upload.url, content=upload.body, headers=upload.headers)
        except httpx.TransportError as exc:
            return _transport_failure(where, exc)
        self._m_duration.observe(time.perf_counter() - started)
        if response.is_success:
            self._m_objects.inc()
            self._m_bytes.inc(len(upload.body))
            self._m_raw.inc(upload.uncompressed)
            self.log.debug("s3_object_written", key=key, entries=len(batch), bytes=len(upload.body))
            return relay.Delivered()
        if response.status_code == 412:
            self._m_present.inc()
            self.log.info("s3_object_already_present", key=key, entries=len(batch),
                          hint="an earlier attempt stored this batch; counted as delivered")
            return relay.Delivered()
        return self._failure(_S3Error.parse(response), where)

    def _failure(self, error: _S3Error, where: str) -> relay.Halted | relay.RetryLater:
        reason = f"{where}: {error}"
        code, status = error.code, error.status
        if code == "RequestTimeTooSkewed":
            return relay.Halted(f"{reason} - this host's clock is more than 15 minutes off S3's "
                                f"(S3's time: {error.fields.get('ServerTime', 'unknown')}); fix time sync "
                                "(chrony, systemd-timesyncd) and the relay carries on")
        if code in ("ExpiredToken", "TokenRefreshRequired"):
            if self.settings.session_token is not None:
                return relay.Halted(f"{reason} - the configured session_token has expired; configure fresh "
                                    "credentials or leave them out to use the AWS chain, which refreshes them")
            self._credentials = None  # resolve the chain again on the next attempt
            return relay.RetryLater(reason)
        if code in _REGION_CODES or status == 301:
            region = error.fields.get("Region") or error.headers.get("x-amz-bucket-region")
            hint = f"set region: {region}" if region else "check region and endpoint_url"
            return relay.Halted(f"{reason} - the bucket is in another region than {self._region}: {hint}")
        if code in _RETRY_CODES or status >= 500 or status in (307, 408, 409, 429):
            return relay.RetryLater(reason, parse_retry_after(error.headers.get("retry-after")))
        return relay.Halted(reason)

    async def check(self) -> str:
        assert self._client is not None, "check() before open()"
        where = f"HeadBucket s3://{self.settings.bucket}"
        try:
            headers = await trio.to_thread.run_sync(self._sign, "HEAD", self._bucket_url, {}, b"")
            response = await self._client.head(self._bucket_url, headers=headers)
        except _CredentialsUnavailable as exc:
            raise relay.CheckFailed(str(exc)) from None
        except httpx.TransportError as exc:
            raise relay.CheckFailed(_transport_failure(where, exc).reason) from None
        region = response.headers.get("x-amz-bucket-region")
        if response.is_success:
            if region and region != self._region:
                raise relay.CheckFailed(f"{where}: the bucket is in {region}, not {self._region}: "
                                        f"set region: {region}")
            method = self._credentials.method if self._credentials else "unknown"
            return f"bucket {self.settings.bucket} is reachable ({self._base}, {method} credentials)"
        error = _S3Error.parse(response)
        if not error.code:
            # HEAD answers carry no body: ask the same question with GET (ListObjectsV2, no keys) for the code.
            url = f"{self._bucket_url}?list-type=2&max-keys=0"
            try:
                headers = await trio.to_thread.run_sync(self._sign, "GET", url, {}, b"")
                again = await self._client.get(url, headers=headers)
                if not again.is_success:
                    error = _S3Error.parse(again)
            except (_CredentialsUnavailable, httpx.TransportError):
                pass
        raise relay.CheckFailed(self._failure(error, where).reason)


def _transport_failure(where: str, exc: httpx.TransportError) -> relay.Halted | relay.RetryLater:
    """Network trouble is retried; a certificate this host does not trust needs someone to act."""
    if (cause := untrusted_certificate(exc)) is not None:
        return relay.Halted(f"{where}: the server's TLS certificate is not trusted ({cause.verify_message}); "
                            "for a private CA, set tls.ca_file")
    return relay.RetryLater(f"{where}: {type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class _S3Error:
    """An S3 error answer: status, `<Code>`, `<Message>` and the other fields of the XML body."""

    status: int
    reason_phrase: str
    code: str
    message: str
    fields: dict[str, str]
    headers: httpx.Headers

    @classmethod
    def parse(cls, response: httpx.Response) -> _S3Error:
        fields: dict[str, str] = {}
        body = response.content[:65536]
        if body.lstrip().startswith(b"<"):
            try:
                root = ElementTree.fromstring(body)
                fields = {child.tag: (child.text or "").strip() for child in root}
            except ElementTree.ParseError:
                pass
        code = fields.get("Code", "")
        message = fields.get("Message", "")
        if not code and body and not body.lstrip().startswith(b"<"):
            message = " ".join(body[:200].decode("utf-8", "replace").split())
        return cls(response.status_code, response.reason_phrase, code, message, fields, response.headers)

    def __str__(self) -> str:
        text = f"{self.status} {self.code or self.reason_phrase}"
        if self.message:
            text += f": {self.message}"
        request_id = self.fields.get("RequestId") or self.headers.get("x-amz-request-id")
        return f"{text} (request id {request_id})" if request_id else text


@relay.hookimpl
def register_destination_types(register):  # type: ignore[no-untyped-def]
    register(S3Destination)
