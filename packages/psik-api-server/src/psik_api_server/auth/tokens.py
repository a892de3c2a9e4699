"""Biscuit bearer tokens (``authz: token``): the server's signing key, minting, and
verifying + authorizing a token for one request.

* The key is an Ed25519 private key in ``<state_dir>/token-key.pem`` (PKCS#8 PEM, mode
  0600), made at the first start and kept: tokens survive restarts, and several servers
  on one state directory agree. It is written to a temp file, then linked into place
  (``link`` fails if the name exists: of two servers starting at once, the loser reads
  the winner's key). A key file others can read or that is not this user's is refused.
* A token's authority block: ``user("<identity>"); check if time($t), $t < <expiry>;``.
  Anyone holding it may append blocks of checks (read-only: ``check if
  operation("GET");``, some jobs: ``check if job($j), [...].contains($j);``, an earlier
  expiry) and hand the narrower token on (``psik_api_client.attenuate``).
* Per request the authorizer supplies ``time(now)``, ``operation("<HTTP method>")`` and,
  on routes of one job, ``job("<jobid>")``, with ``allow if user($u)``, and a time limit
  raised from biscuit's 1 ms (which fails valid tokens under load).

A token that does not parse or verify, or has expired, is :class:`TokenError` 401; one
whose own checks forbid this request (read-only, other jobs) is 403.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import errno
import os
import re
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import StartupError

#: biscuit-python's authorizer limit (default 1 ms: 1-4 valid tokens in 10k fail under load).
MAX_AUTHORIZE_TIME = dt.timedelta(milliseconds=50)
#: A PKCS#8 Ed25519 private key is this DER prefix and the 32 key bytes.
_PKCS8_ED25519 = bytes.fromhex("302e020100300506032b657004220420")
#: An expiry a block states: ``check if time($t), $t < <date>`` (alone, or with more
#: conditions in the same check).
_EXPIRY = re.compile(r"check if [^;]*?time\(\$(\w+)\)[^;]*?\$\1 < ([0-9T:.+Z-]+)")


class TokenError(Exception):
    """A token refused: ``status`` 401 (not valid) or 403 (valid, but not for this)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _biscuit() -> Any:
    try:  # imported when token mode starts: local mode needs none of it
        import biscuit_auth
    except ImportError as e:
        raise StartupError(
            f"authz: token needs biscuit-python (pip install 'biscuit-python>=0.4,<0.5'): {e}"
        ) from None
    return biscuit_auth


def _pem(raw: bytes) -> str:
    body = base64.encodebytes(_PKCS8_ED25519 + raw).decode()
    return f"-----BEGIN PRIVATE KEY-----\n{body}-----END PRIVATE KEY-----\n"


def _read_key(path: Path) -> str:
    # O_NONBLOCK: a FIFO in its place must not hang start-up (it is refused below).
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as e:
        why = "a symbolic link (refused: the key must be this file)" if e.errno == errno.ELOOP else e.strerror
        raise StartupError(f"cannot read the token key {path}: {why}") from None
    try:
        st = os.fstat(fd)
        mode = stat.S_IMODE(st.st_mode)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or mode & 0o077:
            raise StartupError(
                f"token key {path} must be a file of yours with mode 0600 (it is {mode:04o}): "
                f"anyone who reads it can mint tokens for every user; chmod 600 {path}"
            )
        with os.fdopen(os.dup(fd), "r", encoding="ascii") as f:
            return f.read()
    finally:
        os.close(fd)


def load_or_create_key(path: Path) -> str:
    """The PEM text of the key at ``path``, made first if there is none (see module doc)."""
    with contextlib.suppress(FileNotFoundError):
        return _read_key(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    pem = _pem(_biscuit().KeyPair().private_key.to_bytes())
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.write(fd, pem.encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(FileExistsError):  # another server's key won
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
    return _read_key(path)


def rfc3339(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Minted:
    token: str
    user: str
    expires: dt.datetime


@dataclass(frozen=True)
class Shown:
    """What a verified token says: its user, the authority's expiry, each block's source."""

    user: str
    expires: dt.datetime | None
    blocks: list[str]


class TokenAuthority:
    """The server's key and what it does with tokens. ``load`` (start-up) reads or makes
    the key; the rest needs it loaded. ``clock`` gives the time (seconds since the epoch)."""

    def __init__(self, key_path: Path, lifetime: float, clock: Callable[[], float]) -> None:
        self.key_path = key_path
        self.lifetime = lifetime
        self.clock = clock
        self._private: Any = None
        self._public: Any = None

    def load(self) -> None:
        b = _biscuit()
        pem = load_or_create_key(self.key_path)
        try:
            self._private = b.PrivateKey.from_pem(pem)
        except Exception as e:
            raise StartupError(
                f"token key {self.key_path} is not an Ed25519 private key (PEM): {e}"
            ) from None
        self._public = b.KeyPair.from_private_key(self._private).public_key

    @property
    def loaded(self) -> bool:
        return self._private is not None

    @property
    def public_key(self) -> str:
        """``ed25519/<hex>``, as biscuit's ``PublicKey(...)`` takes it."""
        return str(self._public)

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), dt.UTC).replace(microsecond=0)

    def mint(self, user: str, lifetime: float | None = None) -> Minted:
        b = _biscuit()
        expires = self._now() + dt.timedelta(seconds=min(lifetime or self.lifetime, self.lifetime))
        builder = b.BiscuitBuilder("user({u}); check if time($t), $t < {exp};", {"u": user, "exp": expires})
        return Minted(builder.build(self._private).to_base64(), user, expires)

    def _parse(self, token: str) -> Any:
        b = _biscuit()
        try:
            return b.Biscuit.from_base64(token.strip(), self._public)
        except Exception:
            raise TokenError(
                401, "the token is not valid: damaged, not a biscuit, or not signed by this server's key"
            ) from None

    def _authorizer(self, code: str, params: dict[str, Any]) -> Any:
        b = _biscuit()
        builder = b.AuthorizerBuilder(code, params)
        limits = builder.limits()
        limits.max_time = MAX_AUTHORIZE_TIME
        builder.set_limits(limits)
        return builder

    @staticmethod
    def _user(authorizer: Any) -> str:
        b = _biscuit()
        users = {str(f.terms[0]) for f in authorizer.query(b.Rule("u($u) <- user($u)"))}
        if len(users) != 1:
            raise TokenError(401, f"the token names {len(users)} users, not one")
        return users.pop()

    def authorize(self, token: str, operation: str, jobid: str | None) -> str:
        """The user ``token`` acts for on this request (``operation`` an HTTP method,
        ``jobid`` the job of the route, if any); :class:`TokenError` if it may not."""
        b = _biscuit()
        parsed = self._parse(token)
        code = "time({now}); operation({op}); allow if user($u);"
        params: dict[str, Any] = {"now": self._now(), "op": operation}
        if jobid is not None:
            code = "job({job}); " + code
            params["job"] = jobid
        try:
            authorizer = self._authorizer(code, params).build(parsed)
            authorizer.authorize()
        except b.AuthorizationError as e:
            said = str(e.args[0]) if e.args else str(e)
            failed = said.partition("checks failed: ")[2] or said
            if "check if time(" in failed:
                raise TokenError(401, "the token has expired; mint a new one (GET /v1/token)") from None
            if "no matching policy" in said or "limits" in said:
                raise TokenError(401, f"the token is not valid here: {said}") from None
            raise TokenError(403, f"the token does not allow {operation} here: {failed}") from None
        except Exception as e:
            raise TokenError(401, f"the token is not valid here: {e}") from None
        return self._user(authorizer)

    def show(self, token: str) -> Shown:
        """What a token of this server says (401 if it is not one, or has expired: the
        earliest expiry any block states is past). Its other checks (an operation, some
        jobs) are narrowings, not faults: a request they allow would be let through."""
        parsed = self._parse(token)
        try:
            authorizer = self._authorizer("time({now}); allow if true;", {"now": self._now()}).build(parsed)
            user = self._user(authorizer)
        except TokenError:
            raise
        except Exception as e:
            raise TokenError(401, f"the token is not valid: {e}") from None
        blocks = [str(parsed.block_source(i)) for i in range(parsed.block_count())]
        # The earliest expiry any block states (the authority block's is the server's own;
        # a narrowing may set an earlier one, alone or with other conditions). Read from
        # the blocks' source, which is unambiguous: names are plain (certnames), and a
        # later block can only add checks. Job routes run every check in full.
        stated = [
            dt.datetime.fromisoformat(m.group(2).replace("Z", "+00:00"))
            for text in blocks
            for m in _EXPIRY.finditer(text)
        ]
        expires = min(stated, default=None)
        if expires is not None and expires <= self._now():
            raise TokenError(401, f"the token expired at {rfc3339(expires)}; mint a new one (GET /v1/token)")
        return Shown(user, expires, blocks)
