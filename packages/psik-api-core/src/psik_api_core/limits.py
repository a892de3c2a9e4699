"""The request limits of the HTTP contract, stated once.

The server enforces them, its OpenAPI document states them, and the client checks what
it can before sending, all from this one table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    #: Largest JSON request body (a JobSpec is a few KiB; a MiB leaves room for big scripts).
    max_body_bytes: int = 1 << 20
    #: Most ``id`` filters in one ``GET /v1/jobs`` (batch status).
    max_ids: int = 1000
    #: Page size of ``GET /v1/jobs``: the default and the largest allowed.
    default_page_size: int = 100
    max_page_size: int = 1000
    #: Longest ``Idempotency-Key`` header.
    max_idempotency_key: int = 200
    #: Longest ``JobSpec.name`` (it becomes e.g. Slurm's ``--job-name``).
    max_job_name: int = 256
    #: Most bytes of one log in ``GET /v1/jobs/{id}/logs`` (its last ones; the rest is
    #: marked as left out, and ``GET /v1/jobs/{id}/logs/{name}`` has them all).
    max_log_bytes_in_logs: int = 1 << 20
    #: Most entries in one listing of a job's files (``GET /v1/jobs/{id}/files``); the
    #: rest are left out and the listing says ``truncated``.
    max_list_entries: int = 10_000
    #: Most files in one multipart upload (``POST /v1/jobs/{id}/files``).
    max_upload_files: int = 1000
    #: Most labels on one job (``JobSpec.labels``), and the longest label value.
    max_labels: int = 32
    max_label_value: int = 256
    #: Most jobs one ``POST /v1/groups`` makes (a list, or a sweep's combinations), and
    #: most ``after`` entries of one job.
    max_group_jobs: int = 1000
    max_after: int = 100


LIMITS = Limits()


def byte_size(n: int) -> str:
    """A size as people write limits: ``1048576`` is ``"1 MiB"``, ``1536`` is ``"1536 bytes"``."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"
