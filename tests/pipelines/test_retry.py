"""The storage-fault classification and the retry loop (`pipelines.retry`), on the exceptions the real
client libraries raise (botocore, s3fs's translation of them, aiohttp, urllib3, the OS)."""

from __future__ import annotations

import errno
import tarfile

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipelines.retry import (
    ENVIRONMENT,
    TRANSIENT,
    RetryPolicy,
    StorageUnavailableError,
    call_with_retries,
    classify,
    describe,
)


def client_error(code: str | None, status: int = 400, op: str = "GetObject"):
    from botocore.exceptions import ClientError

    error = {"Message": f"message of {code}"}
    if code:
        error["Code"] = code
    return ClientError({"Error": error, "ResponseMetadata": {"HTTPStatusCode": status}}, op)


def s3fs_translated(code: str, status: int = 400) -> OSError:
    """What s3fs raises to its caller for a ClientError (PermissionError, OSError(EBUSY), ...)."""
    from s3fs.errors import translate_boto_error

    return translate_boto_error(client_error(code, status))


@pytest.mark.parametrize("code,status", [
    ("SlowDown", 503), ("ServiceUnavailable", 503), ("InternalError", 500), ("RequestTimeout", 400),
    ("ExpiredToken", 400), ("ThrottlingException", 400), (None, 502), (None, 429),
])
def test_throttling_server_errors_and_expired_tokens_are_transient(code, status):
    assert classify(client_error(code, status)) == TRANSIENT
    if code:  # s3fs hands them on as PermissionError / OSError(EBUSY / EREMOTEIO): the cause decides
        assert classify(s3fs_translated(code, status)) == TRANSIENT


@pytest.mark.parametrize("code,status", [
    ("AccessDenied", 403), ("InvalidAccessKeyId", 403), ("SignatureDoesNotMatch", 403), ("NoSuchBucket", 404),
])
def test_refusals_are_environment_faults(code, status):
    assert classify(client_error(code, status)) == ENVIRONMENT
    if code != "NoSuchBucket":  # s3fs makes that one a FileNotFoundError: the caller's to judge
        assert classify(s3fs_translated(code, status)) == ENVIRONMENT


def test_network_faults_of_every_layer_are_transient():
    import aiohttp
    import botocore.exceptions as bex
    import urllib3.exceptions as uex
    from fsspec.exceptions import FSTimeoutError

    faults = [
        ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), BrokenPipeError(), TimeoutError(),
        TimeoutError("timed out"), OSError(errno.ETIMEDOUT, "timed out"), OSError(errno.EHOSTUNREACH, "no route"),
        aiohttp.ClientPayloadError("Response payload is not completed"), aiohttp.ServerDisconnectedError(),
        bex.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), bex.ReadTimeoutError(endpoint_url="x"),
        bex.ConnectionClosedError(endpoint_url="x"), uex.IncompleteRead(10, 20), FSTimeoutError(),
    ]
    for fault in faults:
        assert classify(fault) == TRANSIENT, fault


def test_a_fault_wrapped_by_a_reader_is_found_through_its_cause():
    try:
        try:
            raise ConnectionResetError(errno.ECONNRESET, "reset")
        except ConnectionResetError as e:
            raise RuntimeError("while reading member 3") from e
    except RuntimeError as outer:
        assert classify(outer) == TRANSIENT


def test_bad_data_and_missing_objects_are_not_storage_faults():
    import botocore.exceptions as bex

    assert classify(tarfile.ReadError("unexpected end of data")) is None
    assert classify(ValueError("no image column")) is None
    assert classify(FileNotFoundError("s3://b/k")) is None
    assert classify(OSError(errno.EINVAL, "bad")) is None
    assert classify(bex.NoCredentialsError()) == ENVIRONMENT
    assert classify(PermissionError("denied")) == ENVIRONMENT


def test_describe_is_one_line_with_the_code():
    line = describe(s3fs_translated("SlowDown", 503))
    assert "\n" not in line and "SlowDown" in line and line.startswith("OSError")


def test_retries_until_it_works_with_growing_waits():
    calls, waits = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise ConnectionResetError(errno.ECONNRESET, "reset")
        return "ok"

    seen = []
    policy = RetryPolicy(attempts=5, base_delay_s=1.0, max_delay_s=3.0)
    assert call_with_retries(flaky, policy=policy, on_retry=seen.append, sleep=waits.append) == "ok"
    assert len(calls) == 4 and len(seen) == 3
    caps = [1.0, 2.0, 3.0]  # base * 2**n, capped at max_delay_s
    assert all(0.5 * cap <= w <= cap for w, cap in zip(waits, caps))


def test_gives_up_after_the_policy_and_at_once_for_other_errors():
    calls = []

    def down():
        calls.append(1)
        raise ConnectionRefusedError(errno.ECONNREFUSED, "refused")

    with pytest.raises(StorageUnavailableError, match="after 3 attempts") as info:
        call_with_retries(down, policy=RetryPolicy(attempts=3), what="reading x", sleep=lambda s: None)
    assert len(calls) == 3 and isinstance(info.value.__cause__, ConnectionRefusedError)

    def denied():
        calls.append(1)
        raise s3fs_translated("AccessDenied", 403)

    calls.clear()
    with pytest.raises(PermissionError):
        call_with_retries(denied, policy=RetryPolicy(attempts=3), sleep=lambda s: None)
    assert len(calls) == 1


@given(st.integers(0, 40), st.floats(0.0, 5.0), st.floats(5.0, 60.0))
def test_backoff_is_jittered_below_a_capped_exponential(retry, base, cap):
    policy = RetryPolicy(attempts=2, base_delay_s=base, max_delay_s=cap)
    wait = policy.delay(retry)
    bound = min(cap, base * 2.0**retry)
    assert 0.5 * bound <= wait <= bound
