"""Who a client certificate names, and whether the CA that signed it may say so.

``certified serve`` lets in any certificate signed by a CA in its ``known_clients/``:
``self.crt`` (the server's own CA, which signs users' introductions) and each user's CA
the admin added (``certified add-client alice alice-CA.crt``). Each user holds the key of
their own CA, so the certificate's name alone proves nothing: bob's CA can sign a
certificate saying ``UID=alice``. Here a certificate names its user only when

* the server's own CA signed it (``known_clients/self.crt``: the admin vouched for the
  name by ``certified introduce``), or
* the CA that signed it was added under that very name: ``known_clients/alice.crt``
  signs only for ``uid:alice`` (or ``cn:alice``, a certificate without a UID).

The name must be one UID (else one CN) of at most 128 characters from
``[A-Za-z0-9._@+-]``: it goes into tokens and lists as it is. Anything else is
:class:`CertificateRefused` (401), with the reason. ``known_clients/`` is read once, at
start-up, as ``certified serve`` reads it.
"""

from __future__ import annotations

import os
import re
import sys
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The characters a certificate's user name may have.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")
#: The known_clients entry of the server's own CA (certified init copies CA.crt there).
SELF = "self"
_CACHE_SIZE = 4096


class CertificateRefused(Exception):
    """The certificate names no user this server may believe; the message says why."""


@dataclass(frozen=True)
class _CA:
    entry: str  # the known_clients file's name, without .crt
    cert: Any  # cryptography.x509.Certificate


def find_config(
    explicit: Path | None, argv: Sequence[str] = sys.argv, environ: Mapping[str, str] = os.environ
) -> Path | None:
    """The certified config directory of the server: ``explicit`` (setting
    ``certified_config``), else ``certified serve``'s own ``--config`` (this process's
    command line), else certified's own defaults: ``$CERTIFIED_CONFIG``,
    ``$VIRTUAL_ENV/etc/certified``, ``/etc/certified``. None if none has ``known_clients/``."""
    candidates: list[Path] = []
    if explicit is not None:
        return explicit
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            candidates.append(Path(argv[i + 1]))
        elif arg.startswith("--config="):
            candidates.append(Path(arg.partition("=")[2]))
    if env := environ.get("CERTIFIED_CONFIG"):
        candidates.append(Path(env))
    if venv := environ.get("VIRTUAL_ENV"):
        candidates.append(Path(venv) / "etc" / "certified")
    candidates.append(Path("/etc/certified"))
    return next((c for c in candidates if (c / "known_clients").is_dir()), None)


class ClientNames:
    """The CAs of ``known_clients/`` and the names each may sign for (module doc)."""

    def __init__(self, config: Path | None) -> None:
        self.config = config
        self._cas: list[_CA] = []
        self._seen: OrderedDict[bytes, str | CertificateRefused] = OrderedDict()

    def load(self) -> None:
        """Read ``known_clients/*.crt`` (nothing if there is no config: every TLS caller
        is then refused, saying why)."""
        from cryptography import x509

        if self.config is None:
            return
        for path in sorted((self.config / "known_clients").glob("*.crt")):
            try:
                certs = x509.load_pem_x509_certificates(path.read_bytes())
            except (OSError, ValueError):
                continue  # certified serve could not use it either
            self._cas.extend(_CA(path.stem, c) for c in certs)

    def identity(self, der: bytes) -> str:
        """``uid:<name>`` or ``cn:<name>`` for the peer certificate ``der``; raises
        :class:`CertificateRefused`."""
        known = self._seen.get(der)
        if known is None:
            try:
                known = self._identity(der)
            except CertificateRefused as e:
                known = e
            self._seen[der] = known
            if len(self._seen) > _CACHE_SIZE:
                self._seen.popitem(last=False)
        if isinstance(known, CertificateRefused):
            raise known
        return known

    def _identity(self, der: bytes) -> str:
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        if self.config is None:
            raise CertificateRefused(
                "the server cannot tell which CA vouches for which user: it found no certified "
                "config directory (set certified_config, or run `certified serve --config DIR`)"
            )
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError as e:
            raise CertificateRefused(f"the client certificate cannot be read: {e}") from None
        uids = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.USER_ID)]
        cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if len(uids) > 1 or (not uids and len(cns) != 1):
            raise CertificateRefused("the client certificate must name one user: one UID, or else one CN")
        kind, name = ("uid", uids[0]) if uids else ("cn", cns[0])
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise CertificateRefused(
                f"the client certificate's {kind.upper()} must be 1-128 of A-Z a-z 0-9 . _ @ + -"
            )
        signers = [ca.entry for ca in self._cas if _issued_by(cert, ca.cert)]
        if SELF in signers or name in signers:
            return f"{kind}:{name}"
        if not signers:
            raise CertificateRefused(
                "the client certificate is not signed directly by a CA this server knows"
            )
        raise CertificateRefused(
            f"the client certificate says {kind}:{name}, but the CA that signed it was added for "
            f"{', '.join(sorted(set(signers)))} (certified add-client NAME CA.crt: a user's CA signs "
            "only for that name; the server's own introductions sign for anyone)"
        )


def _issued_by(cert: Any, ca: Any) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:  # wrong issuer name, wrong key, unsupported algorithm
        return False
    return True
