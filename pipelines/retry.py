"""Storage faults: which exceptions are transient, how they are retried, how they are told to a user.

Owns the one classification of I/O exceptions every pipeline stage and job uses:

- `TRANSIENT`: worth retrying with backoff. A reset, refused or dropped connection, a timeout, a
  truncated response body, throttling (`SlowDown`, 429, 503), a server error (5xx), an expired
  session token (instance-profile credentials are refreshed by the client).
- `ENVIRONMENT`: retrying will not help and the data is not at fault: access denied, bad or missing
  credentials, a wrong endpoint or region, a missing bucket. The run stops with one line naming it.
- `None`: not a storage fault. A reader treats it as the sample's (or shard's) own bad data.

The storage clients retry first (s3fs: 5 tries in ~2 s; botocore: its own); `call_with_retries` is the
slower layer above them that outlasts a minute-long blip. Nothing here decides what becomes an error
row: a transient fault never does (`pipelines.sources`), an environment fault never does either.
"""

from __future__ import annotations

import errno
import logging
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)

TRANSIENT = "transient"
ENVIRONMENT = "environment"

T = TypeVar("T")

# S3 (and S3-compatible) error codes.
TRANSIENT_CODES = frozenset({
    "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "RequestTimeTooSkewed",
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled", "RequestLimitExceeded",
    "TooManyRequestsException", "ProvisionedThroughputExceededException", "BandwidthLimitExceeded",
    "ExpiredToken", "ExpiredTokenException", "TokenRefreshRequired", "RequestExpired", "OperationAborted",
    "PriorRequestNotComplete", "IDPCommunicationError",
})
ENVIRONMENT_CODES = frozenset({
    "AccessDenied", "AccountProblem", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "InvalidSecurity", "InvalidToken", "NotSignedUp", "NoSuchBucket", "PermanentRedirect",
    "AuthorizationHeaderMalformed", "InvalidBucketName", "UnauthorizedOperation", "InvalidClientTokenId",
})
TRANSIENT_ERRNOS = frozenset({
    errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.EPIPE, errno.ETIMEDOUT, errno.EAGAIN,
    errno.EBUSY, errno.ENETDOWN, errno.ENETUNREACH, errno.ENETRESET, errno.EHOSTDOWN, errno.EHOSTUNREACH,
    getattr(errno, "EREMOTEIO", errno.EIO),
})
# Exception class names of client libraries that need not be importable here (aiohttp, urllib3,
# botocore, requests, fsspec, google/azure SDKs): matched by name along the class's MRO.
TRANSIENT_CLASS_NAMES = frozenset({
    "HTTPClientError", "ConnectionClosedError", "EndpointConnectionError", "ReadTimeoutError",
    "ConnectTimeoutError", "ProxyConnectionError", "ResponseStreamingError", "IncompleteReadError",
    "ClientPayloadError", "ClientOSError", "ServerDisconnectedError", "ServerTimeoutError",
    "ClientConnectionError", "ContentLengthError", "TransferEncodingError",
    "IncompleteRead", "ProtocolError", "ReadTimeout", "ConnectTimeout", "NewConnectionError",
    "FSTimeoutError", "ResponseParserError", "RemoteDisconnected", "ServiceRequestError",
    "ServiceResponseError", "TransportError", "RetryError",
})
ENVIRONMENT_CLASS_NAMES = frozenset({
    "NoCredentialsError", "PartialCredentialsError", "NoRegionError", "CredentialRetrievalError",
    "UnknownCredentialError", "InvalidConfigError", "ProfileNotFound", "DefaultCredentialsError",
    "ClientAuthenticationError",
})


def _error_code(exc: BaseException) -> tuple[str | None, int | None]:
    """(service error code, HTTP status) of a botocore-style `ClientError`, else (None, None)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None, None
    code = (response.get("Error") or {}).get("Code")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return (str(code) if code is not None else None), (int(status) if status is not None else None)


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes/contexts, outermost first (cycles cut)."""
    seen: list[BaseException] = []
    while exc is not None and not any(exc is s for s in seen) and len(seen) < 16:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _classify_one(exc: BaseException) -> str | None:
    code, status = _error_code(exc)
    if code in TRANSIENT_CODES:
        return TRANSIENT
    if code in ENVIRONMENT_CODES:
        return ENVIRONMENT
    if status is not None and (status >= 500 or status in (408, 429)):
        return TRANSIENT
    if status in (401, 403):
        return ENVIRONMENT
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & ENVIRONMENT_CLASS_NAMES:
        return ENVIRONMENT
    if names & TRANSIENT_CLASS_NAMES:
        return TRANSIENT
    if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
        return TRANSIENT
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return TRANSIENT
    return None


def classify(exc: BaseException) -> str | None:
    """`TRANSIENT`, `ENVIRONMENT` or None (not a storage fault), looking through the cause chain.

    The most specific answer wins: s3fs turns an `ExpiredToken` ClientError into a PermissionError
    whose cause holds the code, so the cause is read before the outer type.
    """
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return None  # the object is not there: the caller decides whether that is data
    found = [_classify_one(e) for e in _chain(exc)]
    for kind in reversed(found):  # innermost first
        if kind is not None:
            return kind
    if isinstance(exc, PermissionError):
        return ENVIRONMENT
    return None


def is_transient(exc: BaseException) -> bool:
    return classify(exc) == TRANSIENT


def describe(exc: BaseException) -> str:
    """One line for a user: the exception type, its code where the store gave one, the message.
    Never includes request headers or credentials (the message of a storage exception holds neither)."""
    code = next((c for c, _ in map(_error_code, _chain(exc)) if c), None)
    text = " ".join(str(exc).split())[:300]
    name = type(exc).__name__
    return f"{name} ({code}): {text}" if code and code not in text else f"{name}: {text}" if text else name


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Exponential backoff with full jitter: attempt n waits uniform(0, min(max_delay, base * 2**n)).

    The default outlasts about two minutes of outage before giving up on one operation.
    """

    attempts: int = 8  # tries in all, the first one included
    base_delay_s: float = 1.0
    max_delay_s: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")
        if self.base_delay_s < 0 or self.max_delay_s < self.base_delay_s:
            raise ValueError("need 0 <= base_delay_s <= max_delay_s")

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number `retry` (0-based)."""
        cap = min(self.max_delay_s, self.base_delay_s * 2.0**retry)
        return (rng or random).uniform(0.5 * cap, cap)


class StorageUnavailableError(RuntimeError):
    """A transient fault that outlasted the retry policy; the work it belongs to stays unfinished."""

    def __init__(self, what: str, attempts: int, last: BaseException):
        super().__init__(f"{what}: storage unavailable after {attempts} attempts: {describe(last)}")
        self.attempts = attempts
        self.last = last


def call_with_retries(
    fn: Callable[[], T], *, policy: RetryPolicy | None = None, what: str = "storage call",
    on_retry: Callable[[BaseException], None] | None = None, sleep: Callable[[float], None] = time.sleep,
) -> T:
    """`fn()`, retried with backoff while it raises a transient fault.

    Raises `StorageUnavailableError` (from the last fault) once the policy's attempts are spent; any
    other exception, environment faults included, propagates at once.
    """
    policy = policy or RetryPolicy()
    for attempt in range(policy.attempts):
        try:
            return fn()
        except Exception as e:
            if not is_transient(e):
                raise
            if attempt + 1 == policy.attempts:
                raise StorageUnavailableError(what, policy.attempts, e) from e
            wait = policy.delay(attempt)
            log.warning("%s: %s; retry %d/%d in %.1f s", what, describe(e), attempt + 1, policy.attempts - 1, wait)
            if on_retry is not None:
                on_retry(e)
            sleep(wait)
    raise AssertionError("unreachable")
