"""mTLS from a certified identity directory (``cert_dir=`` / ``$PSIK_API_CERTIFIED``),
built with the standard library alone: the client does not depend on certified.

The directory is what ``certified init`` makes and ``certified add-service`` fills in::

    id.crt, id.key          this identity's certificate and key: presented to the server
    known_servers/*.crt     PEM certificates of CAs whose servers are trusted (self.crt:
                            the identity's own CA)
    known_servers/*.yaml    ``add-service`` entries; their ``cert:`` line is the
                            server's CA, base64url DER

Only those CAs are trusted (not the system's): a certified server is known by the
introduction, not by a public CA. The host name is checked against the server's
certificate as usual.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import ssl
from collections.abc import Mapping
from pathlib import Path

ENV = "PSIK_API_CERTIFIED"

#: The ``cert:`` line of an add-service entry (certified writes it as one YAML scalar).
_YAML_CERT = re.compile(r"^cert:\s*['\"]?([A-Za-z0-9_\-+/=]+)['\"]?\s*$", re.MULTILINE)


def resolve_cert_dir(
    cert_dir: str | os.PathLike[str] | None,
    base_url: str,
    *,
    has_transport: bool,
    environ: Mapping[str, str] = os.environ,
) -> Path | None:
    """The identity directory to use for ``base_url``: the argument, else
    ``$PSIK_API_CERTIFIED`` for an ``https://`` server reached over the network.

    An explicit ``cert_dir`` for a plain ``http://`` server is an error (it could not be
    used); the environment's is left alone for one, so one environment serves a local
    server and a remote one."""
    https = base_url.lower().startswith("https://")
    if cert_dir is not None:
        if has_transport:
            raise ValueError("pass either cert_dir= or transport=, not both (a transport brings its own TLS)")
        if not https:
            raise ValueError(f"cert_dir= is for an https:// server; {base_url} is plain http")
        return Path(os.path.expanduser(os.fspath(cert_dir)))
    env = environ.get(ENV) or None
    if env is None or not https or has_transport:
        return None
    return Path(os.path.expanduser(env))


def ssl_context(cert_dir: str | os.PathLike[str]) -> ssl.SSLContext:
    """A client ``SSLContext`` presenting the identity in ``cert_dir`` and trusting its
    known servers. Raises ``ValueError`` naming what is missing or unreadable."""
    base = Path(cert_dir)
    if not base.is_dir():
        raise ValueError(f"no such directory: {base} (a certified identity: `certified init --config DIR`)")
    crt, key = base / "id.crt", base / "id.key"
    for path in (crt, key):
        if not path.is_file():
            raise ValueError(f"{base} is not a certified identity: {path.name} is missing")
    cadata = _known_servers(base / "known_servers")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=cadata)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(crt, key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot use the identity in {base} (id.crt, id.key): {exc}") from exc
    return ctx


def _known_servers(directory: Path) -> str:
    """The PEM text of every CA in ``known_servers/``."""
    if not directory.is_dir():
        raise ValueError(
            f"{directory.parent} knows no server: {directory.name}/ is missing "
            "(`certified add-service HOST SERVER_CA.crt`)"
        )
    pems: list[str] = []
    for path in sorted(directory.iterdir()):
        try:
            if path.suffix in (".crt", ".pem"):
                pems.append(path.read_text(encoding="ascii"))
            elif path.suffix in (".yaml", ".yml"):
                pem = _yaml_cert(path.read_text(encoding="utf-8"))
                if pem is not None:
                    pems.append(pem)
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read {path}: {exc}") from exc
    if not pems:
        raise ValueError(f"{directory} holds no server certificate (`certified add-service`)")
    return "\n".join(pems)


def _yaml_cert(text: str) -> str | None:
    """The CA of an add-service entry, as PEM; None if it names none."""
    match = _YAML_CERT.search(text)
    if match is None:
        return None
    b64 = match.group(1)
    try:
        der = base64.urlsafe_b64decode(b64.replace("+", "-").replace("/", "_") + "=" * (-len(b64) % 4))
    except (binascii.Error, ValueError):
        return None
    return ssl.DER_cert_to_PEM_cert(der)
