"""What an S3 failure means: retry it, report it as missing, or give up (used by :mod:`lib.sealed.cdn`).

Errors: a missing object or bucket is :class:`~lib.errors.NotFoundError`; any other remote
failure is :class:`~lib.errors.UpstreamError` naming the object and the class of the cause, never
a credential. Local filesystem errors are not the store's: :func:`is_local` tells them apart.
"""

from __future__ import annotations

from collections.abc import Iterator

from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, IncompleteReadError
from botocore.exceptions import ConnectionError as BotoConnectionError

from lib.errors import NotFoundError, SealserveError, UpstreamError
from lib.sealed.transfer import TransferError

NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NoSuchBucket", "NotFound"})
# Codes that S3 and its look-alikes send with a non-5xx status but that still mean "try again".
RETRYABLE_CODES = frozenset({
    "RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete", "SlowDown",
    "Throttling", "ThrottlingException", "RequestThrottled", "TooManyRequestsException",
    "RequestLimitExceeded", "BandwidthLimitExceeded", "InternalError", "ServiceUnavailable",
})


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    # boto3 re-raises some ClientErrors wrapped (S3UploadFailedError), keeping the original only
    # as __context__; classification must see through that.
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def client_error_details(exc: ClientError) -> tuple[str, int]:
    code = str(exc.response.get("Error", {}).get("Code", "Unknown"))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def is_retryable(exc: BaseException) -> bool:
    """Whether ``exc`` is a transient failure: connection trouble, 5xx, throttling, a short body."""
    for cause in exception_chain(exc):
        if isinstance(cause, TransferError):
            return cause.retryable
        if isinstance(cause, BotoConnectionError | HTTPClientError | IncompleteReadError):
            return True
        if isinstance(cause, ClientError):
            code, status = client_error_details(cause)
            return status >= 500 or status == 429 or code in RETRYABLE_CODES
    return False


def is_local(exc: BaseException) -> bool:
    """A local filesystem error (disk full, permissions): not the store's fault, never retried."""
    # Several botocore errors also inherit OSError through requests' exceptions; those are remote.
    return isinstance(exc, OSError) and not isinstance(exc, BotoCoreError)


def translate(exc: BaseException, action: str, where: str) -> SealserveError:
    """Our error for ``exc``: names the object and the class of the cause, never a credential."""
    if isinstance(exc, SealserveError):
        return exc
    for cause in exception_chain(exc):
        if isinstance(cause, ClientError):
            code, status = client_error_details(cause)
            if status == 404 or code in NOT_FOUND_CODES:
                return NotFoundError(f"{where} does not exist (S3 {action}: {code})")
            return UpstreamError(f"S3 {action} of {where} failed: ClientError {code} (HTTP {status})")
    return UpstreamError(f"S3 {action} of {where} failed: {type(exc).__name__}")
