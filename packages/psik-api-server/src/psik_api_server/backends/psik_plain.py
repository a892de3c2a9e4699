"""The plain-psik driver: every backend type no driver of its own is registered for
(nersc, globus, iri, ...). psik's submit and cancel as they are; nothing else."""

from __future__ import annotations

from . import BackendDriver, register


@register("*")
class PsikDriver(BackendDriver):
    """psik's own submit and cancel, its callbacks deferred (the context's ``open_job``)."""
