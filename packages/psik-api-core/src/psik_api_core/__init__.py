"""psik-api core: the models, state machine, problem codes and authorization policy
shared by the server and the client. Pure: no I/O and no psik."""

from ._version import __version__
from .authz import LOCAL_USER, Action, OwnerPolicy, Policy, Principal
from .errors import ProblemCode, field_error
from .limits import LIMITS, Limits
from .models import (
    JOBID_PATTERN,
    STRICT_INPUT,
    BackendInfo,
    FieldError,
    Job,
    JobID,
    JobSpec,
    JobStatus,
    JobSummary,
    Page,
    Problem,
    ResourceSpec,
    Transition,
    is_jobid,
    utc,
)
from .states import (
    FINAL_STATES,
    TRANSITIONS,
    JobState,
    can_cancel,
    can_start,
    can_transition,
    derive_state,
    run_outcome,
)

__all__ = [
    "FINAL_STATES",
    "JOBID_PATTERN",
    "LIMITS",
    "LOCAL_USER",
    "STRICT_INPUT",
    "TRANSITIONS",
    "Action",
    "BackendInfo",
    "FieldError",
    "Job",
    "JobID",
    "JobSpec",
    "JobState",
    "JobStatus",
    "JobSummary",
    "Limits",
    "OwnerPolicy",
    "Page",
    "Policy",
    "Principal",
    "Problem",
    "ProblemCode",
    "ResourceSpec",
    "Transition",
    "__version__",
    "can_cancel",
    "can_start",
    "can_transition",
    "derive_state",
    "field_error",
    "is_jobid",
    "run_outcome",
    "utc",
]
