"""What a JobSpec may ask for when callers are not the server's owner (token mode).

In ``authz: local`` every caller is the server's owner, and a spec is as psik takes it.
In token mode a caller is someone else, so two fields are limited:

* ``callback``: the server POSTs there (as the relay of its own callback, see
  callbacks.py), so it may name only a host the config lists in ``callback_hosts``, and
  never, by default, an address in the site's own network (no SSRF): a name matches an
  entry equal to it, or an entry ``*.domain`` it is under; an IP address only an entry
  that is that address. Otherwise 422 naming ``callback``.
* ``inherit_environment``: true starts the job with the *server's* environment, which is
  not the caller's to read. Refused (422) unless ``allow_inherit_environment``; a spec
  that does not give the field gets false (psik's default is true).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from psik_api_core import JobSpec, ProblemCode, field_error

from ..errors import ApiError


def _refuse(field: str, why: str) -> ApiError:
    return ApiError(
        ProblemCode.validation_error,
        f"{field} {why}",
        errors=[field_error(["body", field], why)],
    )


def host_allowed(host: str, allowed: Iterable[str]) -> bool:
    """Whether ``host`` (a URL's host name, or an IP address) is one ``allowed`` lists."""
    host = host.lower().rstrip(".")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if ip is not None:
            try:
                if ipaddress.ip_address(entry.strip("[]")) == ip:
                    return True
            except ValueError:
                continue
        elif entry == host or (entry.startswith("*.") and host.endswith(entry[1:])):
            return True
    return False


@dataclass(frozen=True)
class SpecLimits:
    """The limits above; ``token_mode=False`` (``authz: local``) limits nothing."""

    token_mode: bool = False
    callback_hosts: tuple[str, ...] = ()
    allow_inherit_environment: bool = False

    def check(self, spec: JobSpec) -> JobSpec:
        """``spec`` as this mode runs it, or an :class:`ApiError` (422) naming the field."""
        if not self.token_mode:
            return spec
        if spec.callback is not None:
            host = urlsplit(spec.callback).hostname or ""
            if not host_allowed(host, self.callback_hosts):
                listed = ", ".join(self.callback_hosts) or "none"
                raise _refuse(
                    "callback", f"host {host[:100]!r} is not one this server may call (allowed: {listed})"
                )
        if "inherit_environment" not in spec.model_fields_set:
            return spec.model_copy(update={"inherit_environment": False})
        if spec.inherit_environment and not self.allow_inherit_environment:
            raise _refuse(
                "inherit_environment",
                "true is not allowed here: a job starts with only its own environment",
            )
        return spec
