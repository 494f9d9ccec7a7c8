"""Blob store on S3 or an S3-compatible service: one object per blob at <prefix>ab/<id>."""

from __future__ import annotations

import contextlib
import re
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from saf.blobstore import BLOB_ID_PATTERN, BlobNotFound, validate_blob_id

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

__all__ = ["PART_SIZE", "S3BlobStore"]

PART_SIZE: int = 8 << 20
"""Multipart part size (8 MiB); objects up to this size go up in one put_object."""

MAX_PARTS: int = 10_000
"""S3's limit on parts per multipart upload (so at most ~78 GiB per blob at PART_SIZE)."""

_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_KEY_TAIL_PATTERN = re.compile(r"^([0-9a-f]{2})/([0-9a-f]{16,64})$")


class S3BlobStore:
    """Blobs as S3 objects; credentials come from the usual AWS environment/config chain."""

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region_name: str | None = None,
        client: S3Client | None = None,
    ) -> None:
        if not bucket:
            raise ValueError("bucket must not be empty")
        # "saf" and "saf/" both mean the folder saf/; without the slash keys
        # would come out as "safab/<id>".
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self._bucket = bucket
        self._prefix = prefix
        if client is None:
            client = boto3.client(
                "s3",
                endpoint_url=endpoint_url,
                region_name=region_name,
                config=Config(retries={"mode": "standard", "max_attempts": 5}),
            )
        self._client = client

    @property
    def bucket(self) -> str:
        """The bucket holding the blobs."""
        return self._bucket

    @property
    def prefix(self) -> str:
        """Key prefix ("" or ending in "/")."""
        return self._prefix

    def key_for(self, blob_id: str) -> str:
        """The object key of a blob."""
        validate_blob_id(blob_id)
        return f"{self._prefix}{blob_id[:2]}/{blob_id}"

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (dev and test; production buckets pre-exist)."""
        try:
            self._client.head_bucket(Bucket=self._bucket)
            return
        except ClientError as exc:
            if _error_code(exc) not in _NOT_FOUND_CODES | {"NoSuchBucket"}:
                raise
        region = self._client.meta.region_name
        try:
            if region and region != "us-east-1":
                self._client.create_bucket(
                    Bucket=self._bucket,
                    CreateBucketConfiguration={"LocationConstraint": region},  # type: ignore[typeddict-item]
                )
            else:
                self._client.create_bucket(Bucket=self._bucket)
        except ClientError as exc:
            if _error_code(exc) != "BucketAlreadyOwnedByYou":
                raise

    def put(self, blob_id: str, chunks: Iterable[bytes]) -> int:
        """Upload all chunks: one put_object up to PART_SIZE, else a multipart upload.

        S3 makes an object visible only when put_object or the multipart
        completion succeeds, so readers never see a partial blob. A failure
        aborts the multipart upload, so no parts linger (and cost money).
        """
        key = self.key_for(blob_id)
        buffer = bytearray()
        written = 0
        upload_id: str | None = None
        parts: list[CompletedPartTypeDef] = []
        try:
            for chunk in chunks:
                buffer += chunk
                written += len(chunk)
                # Strictly greater: a blob of exactly PART_SIZE still goes up in one request.
                while len(buffer) > PART_SIZE:
                    if upload_id is None:
                        upload_id = self._client.create_multipart_upload(
                            Bucket=self._bucket, Key=key
                        )["UploadId"]
                    self._upload_part(key, upload_id, parts, bytes(buffer[:PART_SIZE]))
                    del buffer[:PART_SIZE]
            if upload_id is None:
                self._client.put_object(Bucket=self._bucket, Key=key, Body=bytes(buffer))
                return written
            self._upload_part(key, upload_id, parts, bytes(buffer))
            self._client.complete_multipart_upload(
                Bucket=self._bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
            return written
        except BaseException:
            if upload_id is not None:
                self._abort(key, upload_id)
            raise

    def put_many(self, blobs: Sequence[tuple[str, Iterable[bytes]]]) -> list[int]:
        """`put` each in turn (each object is durable when S3 answers); a failure deletes
        those already put."""
        done: list[str] = []
        written: list[int] = []
        try:
            for blob_id, chunks in blobs:
                written.append(self.put(blob_id, chunks))
                done.append(blob_id)
        except BaseException:
            for blob_id in done:
                self.delete(blob_id)
            raise
        return written

    def open(self, blob_id: str) -> _S3Reader:
        """Start a GET of the blob; BlobNotFound if there is no such object."""
        key = self.key_for(blob_id)
        try:
            response = self._client.get_object(Bucket=self._bucket, Key=key)
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND_CODES:
                raise BlobNotFound(blob_id, self.describe()) from None
            raise
        return _S3Reader(response["Body"])

    def exists(self, blob_id: str) -> bool:
        """Whether an object exists for the blob (a HEAD request)."""
        key = self.key_for(blob_id)
        try:
            self._client.head_object(Bucket=self._bucket, Key=key)
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND_CODES:
                return False
            raise
        return True

    def check(self) -> None:
        """The bucket must exist and answer (a HEAD request on the bucket)."""
        self._client.head_bucket(Bucket=self._bucket)

    def delete(self, blob_id: str) -> None:
        """Delete the blob's object (S3 treats deleting a missing key as success)."""
        self._client.delete_object(Bucket=self._bucket, Key=self.key_for(blob_id))

    def iter_ids(self) -> Iterator[str]:
        """Every stored blob id under the prefix, in key order; other keys are skipped."""
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self._bucket, Prefix=self._prefix):
            for obj in page.get("Contents", []):
                match = _KEY_TAIL_PATTERN.fullmatch(obj["Key"][len(self._prefix) :])
                if match and match[2].startswith(match[1]) and BLOB_ID_PATTERN.fullmatch(match[2]):
                    yield match[2]

    def describe(self) -> str:
        """E.g. "s3://bucket/prefix/ @ http://127.0.0.1:9000" (never credentials)."""
        endpoint = _without_userinfo(self._client.meta.endpoint_url)
        return f"s3://{self._bucket}/{self._prefix} @ {endpoint}"

    def __repr__(self) -> str:
        return f"S3BlobStore({self.describe()!r})"

    def _upload_part(
        self, key: str, upload_id: str, parts: list[CompletedPartTypeDef], body: bytes
    ) -> None:
        number = len(parts) + 1
        if number > MAX_PARTS:
            raise ValueError(
                f"blob at s3://{self._bucket}/{key} exceeds {MAX_PARTS} parts of {PART_SIZE} bytes"
            )
        response = self._client.upload_part(
            Bucket=self._bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
        )
        parts.append({"PartNumber": number, "ETag": response["ETag"]})

    def _abort(self, key: str, upload_id: str) -> None:
        # If the abort fails too, the original error matters more; a bucket
        # lifecycle rule for incomplete multipart uploads is the backstop.
        with contextlib.suppress(ClientError, BotoCoreError):
            self._client.abort_multipart_upload(Bucket=self._bucket, Key=key, UploadId=upload_id)


class _S3Reader:
    """A get_object body as a Readable context manager that closes the connection on exit."""

    def __init__(self, body: Any) -> None:
        self._body = body

    def read(self, n: int = -1) -> bytes:
        # botocore's StreamingBody takes None, not -1, for "everything".
        data: bytes = self._body.read(None if n < 0 else n)
        return data

    def close(self) -> None:
        self._body.close()

    def __enter__(self) -> _S3Reader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _without_userinfo(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
