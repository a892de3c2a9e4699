"""Typed sync and async client of psik-api, the REST job API in front of psik.

::

    from psik_api_client import Client, JobSpec

    with Client() as api:  # $PSIK_API_UDS, $PSIK_API_URL, or http://127.0.0.1:8000
        job = api.submit(JobSpec(name="hello", script="echo hello"))
        job = api.wait(job.jobid, timeout=60)
        sweep = api.sweep(JobSpec(script="./fit $X"), {"X": ["1", "2"]})  # one request
        report = api.submit(JobSpec(script="./report"), after=sweep.jobs, labels={"run": "r1"})
        api.wait_all(sweep)  # a few requests, however many jobs
        for event in api.watch(after=0):  # every event of your jobs, then live ones
            print(event.id, event.jobid, event.job_state)

``AsyncClient`` has the same methods, awaited. Errors are the classes of
``_exceptions`` (all subclasses of :class:`PsikApiError`); the models come from
``psik_api_core``. Every method takes the per-call options ``timeout=`` and
``extra_headers=``; :data:`NOT_GIVEN` is the "left out" value of ``timeout=``.

For a server run under ``certified serve``: ``Client(url, cert_dir=...)`` (mTLS with a
certified identity, or ``$PSIK_API_CERTIFIED``), ``token=`` (or ``$PSIK_API_TOKEN``) for
a bearer token minted by ``api.token()``, and :func:`attenuate` to narrow a token
offline (read-only, some jobs, an earlier expiry).
"""

from psik_api_core import (
    BackendInfo,
    Dependency,
    Event,
    FileInfo,
    FileListing,
    Group,
    Job,
    JobSpec,
    JobState,
    JobStatus,
    JobSummary,
    Page,
    Problem,
    ResourceSpec,
)
from psik_api_core.models import JobsTable, jobs_table

from ._async_client import AsyncClient
from ._client import Client
from ._exceptions import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    CertificateRefusedError,
    ChecksumMismatchError,
    ConflictError,
    IdempotencyInFlightError,
    IdempotencyMismatchError,
    InsufficientStorageError,
    InternalServerError,
    InvalidPathError,
    InvalidRequestError,
    JobFilesInvalidError,
    MethodNotAllowedError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionFailedError,
    PsikApiError,
    RangeNotSatisfiableError,
    RateLimitError,
    RequestTooLargeError,
    ServiceUnavailableError,
    SubmitFailedError,
    TooManyStreamsError,
    UnknownBackendError,
    UnprocessableEntityError,
    UnsupportedMediaTypeError,
    WaitTimeout,
)
from ._tokens import attenuate
from ._types import NOT_GIVEN, NotGiven
from ._version import __version__

__all__ = [
    "NOT_GIVEN",
    "APIConnectionError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncClient",
    "AuthenticationError",
    "BackendInfo",
    "BadRequestError",
    "CertificateRefusedError",
    "ChecksumMismatchError",
    "Client",
    "ConflictError",
    "Dependency",
    "Event",
    "FileInfo",
    "FileListing",
    "Group",
    "IdempotencyInFlightError",
    "IdempotencyMismatchError",
    "InsufficientStorageError",
    "InternalServerError",
    "InvalidPathError",
    "InvalidRequestError",
    "Job",
    "JobFilesInvalidError",
    "JobSpec",
    "JobState",
    "JobStatus",
    "JobSummary",
    "JobsTable",
    "MethodNotAllowedError",
    "NotFoundError",
    "NotGiven",
    "Page",
    "PermissionDeniedError",
    "PreconditionFailedError",
    "Problem",
    "PsikApiError",
    "RangeNotSatisfiableError",
    "RateLimitError",
    "RequestTooLargeError",
    "ResourceSpec",
    "ServiceUnavailableError",
    "SubmitFailedError",
    "TooManyStreamsError",
    "UnknownBackendError",
    "UnprocessableEntityError",
    "UnsupportedMediaTypeError",
    "WaitTimeout",
    "__version__",
    "attenuate",
    "jobs_table",
]
