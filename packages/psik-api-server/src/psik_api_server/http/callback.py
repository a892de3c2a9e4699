"""``POST /v1/callback``: the state reports psik sends for jobs of a server with
``callback_url`` (see :mod:`psik_api_server.jobs.callbacks`).

No token: the signature is the authentication. The body must carry
``x-hub-signature-256: sha256=<HMAC-SHA256 of the raw body>`` made with the secret of
the job it names; anything else (unsigned, another secret, an unknown job, a body that
is not a report) is 401 and nothing is recorded. The answers do not say which of those
it was, beyond "unsigned": a job's existence is not told to whoever can reach the route.
An accepted report is recorded (:meth:`JobService.record_report`), relayed to the job
owner's own callback, and answered 204. A stale report (a state of a run already ended or
followed by another, a job purged meanwhile) is answered 204 too and neither recorded nor
relayed; a state is relayed once (a replay is not relayed again).

In ``authz: local`` the app's checks (:mod:`psik_api_server.auth.local`) still apply here: only the
owner's processes on this host reach the route, so reports come from local jobs (psik
in the job's own process); a remote backend's cannot arrive. The route is for servers
whose jobs run elsewhere (token mode, under ``certified serve``).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from psik_api_core import JobState, ProblemCode, is_jobid

from ..aio import in_thread
from ..context import context
from ..errors import ApiError
from ..jobs.callbacks import SIGNATURE_HEADER, read_record, report_jobid, signed_by
from .bodies import read_body

#: A report is ~100 bytes; a longer body is refused before it is read on.
MAX_REPORT_BYTES = 16 * 1024
#: Checked when no job has the id given, so an unknown job costs what a known one does.
_NO_SECRET = "0" * 64


class Report(BaseModel):
    """psik's ``Callback``: the state a job's run reached."""

    model_config = ConfigDict(extra="forbid", strict=True)

    jobid: str
    jobndx: int = Field(ge=0, le=1_000_000)
    state: JobState
    info: str = Field(default="", max_length=4096)


def _refused(why: str) -> ApiError:
    return ApiError(ProblemCode.unauthorized, f"callback refused: {why}; nothing was recorded")


async def post_callback(request: Request) -> Response:
    if request.query_params:
        raise _refused("the route takes no query parameters")
    service = context(request.app).service
    body = await read_body(request, MAX_REPORT_BYTES, "a callback body")
    signature = request.headers.get(SIGNATURE_HEADER)
    if signature is None:
        raise _refused(f"the body is not signed (no {SIGNATURE_HEADER} header)")
    not_signed = _refused("the signature is not that of the job the report names")
    try:  # what costs nothing comes first: a body that is no report opens no job's files
        report = Report.model_validate_json(body)
    except ValidationError:
        raise not_signed from None
    jobid = report_jobid(body)
    record = None
    if jobid is not None and is_jobid(jobid):
        # read_record never waits on the job's file (a FIFO there is no record)
        record = await in_thread(read_record, service.backend.path(jobid))
    if not signed_by(body, record.secret if record else _NO_SECRET, signature) or record is None:
        raise not_signed
    if report.state is JobState.new:
        raise not_signed
    assert jobid is not None
    if await service.record_report(jobid, report.jobndx, report.state, report.info):
        service.relay.relay(jobid, record, body, (report.jobndx, report.state.value))
    return Response(status_code=204)
