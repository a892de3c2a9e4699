"""Job callbacks: psik's state reports to this server, and the relay to a user's own URL.

With ``callback_url`` set, each job created gets a secret made for it (32 random bytes,
hex), and psik's spec.json gets ``callback=callback_url``, ``cb_secret=<that secret>``:
psik then POSTs each state the job reaches (``{"jobid", "jobndx", "state", "info"}``)
with ``x-hub-signature-256: sha256=<HMAC-SHA256 of the raw body>`` (psik's ``web.py``).
``POST /v1/callback`` (routes_callback.py) takes only a body signed with its job's
secret.

What the user asked for (``callback``, ``cb_secret``, ``cb_headers``) is kept beside the
secret, in a :class:`CallbackRecord` in the file ``<job dir>/.psik-api-callback`` (0600,
in the owner-only job directory), and :class:`CallbackRelay` posts each accepted report
on to it, signed with the user's secret as psik would sign it, in the background with a
timeout. A file rather than an index table: the index can be rebuilt from the job
directories (a corrupt one is), and a table would lose the secrets then; a file lives
and dies with its job (a purge removes it) and is never served (the file routes serve
the job's working directory, the log routes its ``log/``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from psik_api_core import JobSpec

from .directory import read_job_file, write_private

_logger = logging.getLogger(__name__)

#: The file beside psik's spec.json holding a job's :class:`CallbackRecord`.
RECORD_NAME = ".psik-api-callback"
#: The header psik signs its callbacks with.
SIGNATURE_HEADER = "x-hub-signature-256"
#: How long one relayed POST may take before it is given up (and logged).
RELAY_TIMEOUT = 30.0
#: A record file is a few hundred bytes; anything past this is not one of ours.
_MAX_RECORD = 64 * 1024


def sign(body: bytes, secret: str) -> str:
    """psik's signature of ``body``: ``sha256=<hex HMAC-SHA256 with secret>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def signed_by(body: bytes, secret: str, signature: str | None) -> bool:
    """Whether ``signature`` is ``sign(body, secret)``, compared in constant time."""
    if signature is None:
        return False
    return hmac.compare_digest(sign(body, secret).encode(), signature.encode("utf-8", "surrogateescape"))


class CallbackRecord(BaseModel):
    """A job's callback secret, and the callback its owner asked for (if any)."""

    model_config = ConfigDict(extra="forbid")

    secret: str
    callback: str | None = None
    cb_secret: str | None = None
    cb_headers: dict[str, str] = Field(default_factory=dict)


def split_spec(spec: JobSpec, callback_url: str | None) -> tuple[JobSpec, CallbackRecord | None]:
    """The spec psik gets, and the record to keep: with ``callback_url``, psik reports
    to this server with a new secret, and the user's callback is kept for the relay."""
    if callback_url is None:
        return spec, None
    record = CallbackRecord(
        secret=secrets.token_hex(32),
        callback=spec.callback,
        cb_secret=spec.cb_secret.get_secret_value() if spec.cb_secret else None,
        cb_headers=dict(spec.cb_headers),
    )
    ours = {"callback": callback_url, "cb_secret": record.secret, "cb_headers": {}}
    return JobSpec.model_validate(spec.model_dump() | ours), record


def write_record(base: Path, record: CallbackRecord) -> None:
    """Write ``record`` into the job directory ``base``, owner-only from the start."""
    write_private(base / RECORD_NAME, record.model_dump_json())


def read_record(base: Path) -> CallbackRecord | None:
    """The job's record; None if it has none (or it cannot be read, or is not ours)."""
    try:  # the job may have made it a FIFO or a link: read only a regular file, bounded
        return CallbackRecord.model_validate_json(read_job_file(base, RECORD_NAME, _MAX_RECORD))
    except (OSError, ValueError):
        return None


#: How many relayed states :class:`CallbackRelay` remembers.
_MAX_RELAYED = 100_000


class CallbackRelay:
    """Posts accepted reports on to the users' callbacks, in the background: a slow or
    dead receiver holds up neither the report nor the job. Each POST has
    :data:`RELAY_TIMEOUT`; redirects are not followed (in token mode the host was
    checked against ``callback_hosts``, and a redirect could lead anywhere). A failure is
    logged once per job (a dead receiver would otherwise log every state change)."""

    def __init__(self, timeout: float = RELAY_TIMEOUT) -> None:
        self.timeout = timeout
        self._tasks: set[asyncio.Task[None]] = set()
        self._failed: set[str] = set()
        # (jobid, jobndx, state) relayed by this process, oldest first: a replayed
        # report is not relayed again (bounded; a restart forgets them).
        self._relayed: dict[tuple[str, int, str], None] = {}

    def relay(
        self, jobid: str, record: CallbackRecord, body: bytes, state: tuple[int, str] | None = None
    ) -> None:
        """Post ``body`` (the report as psik sent it) to the user's callback, if any;
        once per ``state`` (jobndx, state) of the job when given."""
        if record.callback is None:
            return
        if state is not None:
            seen = (jobid, *state)
            if seen in self._relayed:
                return
            self._relayed[seen] = None
            if len(self._relayed) > _MAX_RELAYED:
                del self._relayed[next(iter(self._relayed))]
        task = asyncio.get_running_loop().create_task(self._post(jobid, record, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, jobid: str, record: CallbackRecord, body: bytes) -> None:
        assert record.callback is not None
        headers = dict(record.cb_headers)
        headers["content-type"] = "application/json"
        if record.cb_secret:
            headers[SIGNATURE_HEADER] = sign(body, record.cb_secret)
        try:
            status = await post_report(record.callback, body, headers, self.timeout)
            if status >= 300:
                raise RuntimeError(f"answered {status}")
        except Exception as e:
            level = logging.DEBUG if jobid in self._failed else logging.WARNING
            if len(self._failed) < 10_000:
                self._failed.add(jobid)
            _logger.log(level, "job %s: its callback to %s was not delivered: %s", jobid, record.callback, e)

    async def wait(self) -> None:
        """Until every relay started so far is done (for tests and shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task


async def post_report(url: str, body: bytes, headers: Mapping[str, str], seconds: float) -> int:
    """POST a job's report to a callback URL, for at most ``seconds``; the reply's status
    (aiohttp's errors raise).
    Nothing of the server account's goes along: with ``trust_env`` aiohttp would add
    ``~/.netrc``'s login for the host (a netrc ``default`` entry fits every host) and go
    through the account's proxies, to a URL a user chose. Redirects are not followed."""
    import aiohttp  # psik's own HTTP client (a dependency of psik)

    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=seconds), trust_env=False) as session,
        session.post(url, data=body, headers=dict(headers), allow_redirects=False) as reply,
    ):
        return reply.status


def psik_sender(job: Any, timeout: float = RELAY_TIMEOUT) -> Callable[[int, Any, str], Awaitable[bool]]:
    """A psik job's ``send_callback``, posting psik's report, signed as psik signs it,
    with :func:`post_report`: psik's own sender trusts the environment (netrc, proxies)
    and, with ``certified`` installed, shows the server's client certificate."""

    async def send_callback(jobndx: int, state: Any, info: str) -> bool:
        from psik.exceptions import CallbackException
        from psik.models import Callback

        spec = job.spec
        if spec.callback is None:
            return True
        body = Callback(jobid=job.stamp, jobndx=jobndx, state=state, info=info).model_dump_json().encode()
        headers = {"content-type": "application/json", "accept": "application/json"}
        if spec.cb_secret:
            headers[SIGNATURE_HEADER] = sign(body, spec.cb_secret.get_secret_value())
        try:
            return await post_report(spec.callback, body, headers, timeout) < 300
        except Exception as e:
            # The one failure psik's job process logs and goes on from (as psik's own
            # sender raises it): anything else ends the job before its script runs.
            raise CallbackException(f"POST to {spec.callback}: {e}") from e

    return send_callback


def report_jobid(body: bytes) -> str | None:
    """The ``jobid`` a report names, read before its signature can be checked (to find
    the secret); None if the body is not a JSON object naming one."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    jobid = doc.get("jobid") if isinstance(doc, dict) else None
    return jobid if isinstance(jobid, str) else None
