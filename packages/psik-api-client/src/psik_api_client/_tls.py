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

As certified's own client does, a server with an ``add-service`` entry of its own
(``known_servers/<host>.yaml``) is met on that entry's terms: only its ``cert`` is
trusted for it, and where the server introduced this identity (``add-intro``: the
certificate it signed is ``id/<signer>.crt``, the signer named in the entry's
``auths``), that certificate is presented instead of ``id.crt``, so a server that knows
this user only by its introduction accepts them.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
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


def ssl_context(cert_dir: str | os.PathLike[str], host: str | None = None) -> ssl.SSLContext:
    """A client ``SSLContext`` presenting the identity in ``cert_dir`` and trusting its
    known servers (for ``host``: its own entry's terms, if it has one). Raises
    ``ValueError`` naming what is missing or unreadable."""
    return tls_identity(cert_dir, host)[0]


def tls_identity(
    cert_dir: str | os.PathLike[str], host: str | None = None
) -> tuple[ssl.SSLContext, Presented]:
    """:func:`ssl_context`, and the certificate it presents."""
    base = Path(cert_dir)
    if not base.is_dir():
        raise ValueError(f"no such directory: {base} (a certified identity: `certified init --config DIR`)")
    crt, key = base / "id.crt", base / "id.key"
    for path in (crt, key):
        if not path.is_file():
            raise ValueError(f"{base} is not a certified identity: {path.name} is missing")
    entry = _service_entry(base / "known_servers", host) if host else None
    cadata = entry.cert if entry is not None and entry.cert else _known_servers(base / "known_servers")
    if entry is not None:
        crt = next(
            (c for a in entry.auths if _safe_name(a) and (c := base / "id" / f"{a}.crt").is_file()), crt
        )
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=cadata)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(crt, key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot use the identity in {base} (id.crt, id.key): {exc}") from exc
    return ctx, Presented(crt)


#: Short names of the subject attributes certified writes.
_SHORT = {
    "commonName": "CN",
    "userId": "UID",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "emailAddress": "emailAddress",
}


@dataclass(frozen=True)
class Presented:
    """The client certificate a context presents: what a refusal message names."""

    path: Path

    def describe(self) -> str:
        """``subject (issued by issuer; path)``, or the path alone where the standard
        library cannot decode it."""
        # The only certificate decoder of the standard library (the client does not
        # depend on cryptography); a Python without it still names the file.
        decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
        try:
            info = decode(str(self.path)) if decode is not None else None
        except (OSError, ssl.SSLError, ValueError):
            info = None
        if not isinstance(info, dict):
            return str(self.path)
        return f"{_name(info.get('subject'))} (issued by {_name(info.get('issuer'))}; {self.path})"


def _name(rdns: object) -> str:
    """An X.509 name as ``ssl`` decodes it (tuples of (key, value) pairs), as text."""
    if not isinstance(rdns, tuple):
        return "?"
    parts = [
        f"{_SHORT.get(key, key)}={value}"
        for rdn in rdns
        if isinstance(rdn, tuple)
        for pair in rdn
        if isinstance(pair, tuple) and len(pair) == 2
        for key, value in [pair]
    ]
    return ", ".join(parts) or "?"


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


@dataclass(frozen=True)
class _Entry:
    """What an ``add-service`` entry says: the server's certificate (PEM, or None) and
    the signers whose certificates of this identity the server accepts."""

    cert: str | None
    auths: tuple[str, ...]


def _service_entry(directory: Path, host: str) -> _Entry | None:
    """The entry ``known_servers/<host>.yaml``, if there is one."""
    if not _safe_name(host):
        return None
    path = directory / f"{host}.yaml"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    return _Entry(cert=_yaml_cert(text), auths=tuple(_yaml_list(text, "auths")))


def _safe_name(name: str) -> bool:
    """A name usable as one file name (no path, no NUL)."""
    return bool(name) and name not in {".", ".."} and "/" not in name and "\0" not in name


def _yaml_list(text: str, key: str) -> list[str]:
    """The items of the top-level block list ``key`` as ``yaml.dump`` writes it (``- item``
    lines, a long item folded onto indented lines; plain, 'single' or "double" quoted)."""
    items: list[str] = []
    inside = False
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line.startswith((" ", "-")):
            inside = line.split(":", 1)[0] == key and line.rstrip().endswith(":")
            continue
        if not inside:
            continue
        stripped = line.strip()
        if line.startswith("-"):
            items.append(stripped[1:].strip())
        elif items:
            items[-1] = f"{items[-1]} {stripped}"
    return [_unquote(i) for i in items]


def _unquote(item: str) -> str:
    if len(item) >= 2 and item[0] == item[-1] == "'":
        return item[1:-1].replace("''", "'")
    if len(item) >= 2 and item[0] == item[-1] == '"':
        return item[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return item


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
